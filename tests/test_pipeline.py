"""End to end on real data (sklearn digits): train, precompute (resume, several processes,
mismatch), verify, and distill from the cache against a live teacher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from kdcache.distill import DistillConfig, build_job
from kdcache.engine import fit
from kdcache.errors import KdcacheError
from kdcache.models import read_checkpoint
from kdcache.precompute import PrecomputeConfig, precompute, verify
from kdcache.replay import replayer_for
from kdcache.recipes import make_recipe
from kdcache.storage import LogitStore, slab_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def precompute_cfg(data_dir, ckpt, out, **kw) -> PrecomputeConfig:
    base = dict(teacher="resnet8", ckpt=ckpt, data_dir=data_dir, views={"weak": "weak", "strong": "strong"},
                rounds=2, out=out, batch_size=256, device="cpu")
    return PrecomputeConfig(**{**base, **kw})


def cli_precompute_args(data_dir, ckpt, out, rounds) -> list[str]:
    return ["precompute", "--teacher", "resnet8", "--ckpt", str(ckpt), "--data", str(data_dir), "--rounds",
            str(rounds), "--out", str(out), "--device", "cpu", "--batch-size", "256", "--quiet"]


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of every complete slab, read with plain zarr."""
    store = LogitStore.open(path)
    root = zarr.open_group(path, mode="r")
    out = {}
    for round_, view in store.complete_slabs():
        group = root[slab_path(round_, view)]
        for name, array in group.arrays():
            out[f"{round_}/{view}/{name}"] = array[:]
    return out


def assert_same_stores(a: Path, b: Path) -> None:
    arrays_a, arrays_b = store_arrays(a), store_arrays(b)
    assert arrays_a.keys() == arrays_b.keys() and arrays_a
    for key in arrays_a:
        np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)


# ---------------------------------------------------------------- train

def test_train_learns(teacher_ckpt):
    ckpt = read_checkpoint(teacher_ckpt)
    history = ckpt["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    assert history[-1]["test_top1"] > 50.0  # 10 classes: chance is 10%
    assert history[-1]["lr"] == pytest.approx(0.01) and history[0]["lr"] == pytest.approx(0.1)
    assert ckpt["model_name"] == "resnet8" and ckpt["num_classes"] == 10


def test_resume_equals_uninterrupted(digits_dir, tmp_path):
    def run(out, epochs, resume=False):
        recipe = make_recipe("resnet8", epochs=epochs, batch_size=128, lr_decay_epochs=[2])
        cfg = DistillConfig(student="resnet8", loss="ce", data_dir=digits_dir, out=out, recipe=recipe,
                            device="cpu", show_progress=False)
        return fit(build_job(cfg), resume=resume)

    full = run(tmp_path / "full", 3)
    run(tmp_path / "split", 2)  # "interrupted" after epoch 2
    resumed = run(tmp_path / "split", 3, resume=True)
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert resumed[-1]["train_loss"] == pytest.approx(full[-1]["train_loss"], rel=1e-5)
    a = read_checkpoint(tmp_path / "full" / "last.pth")["model"]
    b = read_checkpoint(tmp_path / "split" / "last.pth")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_new_run_refuses_to_overwrite_and_resume_needs_a_run(digits_dir, teacher_ckpt, tmp_path):
    recipe = make_recipe("resnet8", epochs=1)
    cfg = DistillConfig(student="resnet8", loss="ce", data_dir=digits_dir, out=teacher_ckpt.parent, recipe=recipe,
                        device="cpu", show_progress=False)
    with pytest.raises(KdcacheError, match="--resume"):
        fit(build_job(cfg))
    cfg.out = tmp_path / "none"
    with pytest.raises(KdcacheError, match="nothing to resume"):
        fit(build_job(cfg), resume=True)
    assert not cfg.out.exists()


# ---------------------------------------------------------------- precompute

def test_precompute_stores_the_teacher_logits_of_replayed_views(digits_dir, teacher_ckpt, tmp_path):
    store = precompute(precompute_cfg(digits_dir, teacher_ckpt, tmp_path / "s"), progress=False)
    assert store.missing_slabs() == [] and store.rounds == 2 and store.views == ["weak", "strong"]
    assert store.attrs["teacher_test_top1"] > 50.0
    # Recompute one slab independently: other batch size, shuffled order.
    from kdcache.data import load_split
    from kdcache.models import load_teacher

    teacher = load_teacher("resnet8", teacher_ckpt, 10)
    images, _ = load_split(digits_dir, "train")
    replayer = replayer_for(store)
    idx = torch.randperm(len(images))[:100]
    with torch.no_grad():
        fresh = teacher(replayer(1, "strong", images[idx], idx))
    torch.testing.assert_close(store.slab(1, "strong")[idx], fresh, rtol=2**-10, atol=1e-3)
    assert torch.equal(store.seeds(1, "strong")[idx], replayer.seeds(1, "strong", idx))
    assert not torch.equal(store.slab(0, "strong"), store.slab(1, "strong"))  # rounds differ
    stats = store.slab_stats(0, "weak")
    assert 0.0 < stats["max_abs_error"] < 0.05 and stats["teacher_top1"] > 30.0

    result = verify(store.path, teacher_ckpt, digits_dir, samples=64, device="cpu")
    assert result["ok"] and result["samples"] == 64 and result["top1_agreement"] == 1.0


def test_verify_detects_wrong_logits(digits_dir, teacher_ckpt, tmp_path):
    store = precompute(precompute_cfg(digits_dir, teacher_ckpt, tmp_path / "s", rounds=1, views={"weak": "weak"}),
                       progress=False)
    # Wrong logits written through the store (e.g. by another teacher): intact files, wrong values.
    logits, seeds, stats = store.slab(0, "weak") + 0.5, store.seeds(0, "weak"), store.slab_stats(0, "weak")
    zarr.open_group(tmp_path / "s" / slab_path(0, "weak"), mode="r+").update_attributes({"complete": False})
    store.write_slab(0, "weak", logits, seeds, stats)
    result = verify(store.path, teacher_ckpt, digits_dir, samples=32, device="cpu")
    assert not result["ok"] and result["max_abs_diff"] > 0.4
    # Edited behind the store's back: its files no longer match the marker.
    array = zarr.open_array(tmp_path / "s" / slab_path(0, "weak") / "logits", mode="r+")
    array[:] = array[:] + np.float16(0.5)
    with pytest.raises(KdcacheError, match=r"slab \(round 0, view 'weak'\) of .* is damaged"):
        verify(store.path, teacher_ckpt, digits_dir, samples=32, device="cpu")


def test_existing_store_with_other_settings_is_an_error_naming_the_field(digits_dir, teacher_ckpt, tmp_path):
    precompute(precompute_cfg(digits_dir, teacher_ckpt, tmp_path / "s", rounds=1), progress=False)
    with pytest.raises(KdcacheError, match="store_seed"):
        precompute(precompute_cfg(digits_dir, teacher_ckpt, tmp_path / "s", rounds=1, seed=7), progress=False)
    with pytest.raises(KdcacheError, match="encoding"):
        precompute(precompute_cfg(digits_dir, teacher_ckpt, tmp_path / "s", rounds=1, encoding="int8"), progress=False)
    store = precompute(precompute_cfg(digits_dir, teacher_ckpt, tmp_path / "s", rounds=1, seed=7, overwrite=True),
                       progress=False)
    assert store.identity["store_seed"] == 7


def test_precompute_killed_then_resumed_equals_uninterrupted(digits_dir, teacher_ckpt, tmp_path):
    rounds = 12
    args = [sys.executable, "-m", "kdcache.cli", *cli_precompute_args(digits_dir, teacher_ckpt, tmp_path / "killed", rounds)]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    done_at_kill = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done_at_kill = len(LogitStore.open(tmp_path / "killed").complete_slabs())
        except KdcacheError:
            done_at_kill = 0
        if done_at_kill >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 3 <= done_at_kill < 2 * rounds
    rerun = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    subprocess.run([sys.executable, "-m", "kdcache.cli", *cli_precompute_args(digits_dir, teacher_ckpt, tmp_path / "clean", rounds)],
                   env=ENV, check=True, capture_output=True, timeout=300)
    assert LogitStore.open(tmp_path / "killed").missing_slabs() == []
    assert_same_stores(tmp_path / "killed", tmp_path / "clean")


def test_two_process_precompute_equals_one_process(digits_dir, teacher_ckpt, tmp_path):
    rounds = 3
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                "-m", "kdcache.cli"]
    two = subprocess.run([*torchrun, *cli_precompute_args(digits_dir, teacher_ckpt, tmp_path / "two", rounds)],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    subprocess.run([sys.executable, "-m", "kdcache.cli", *cli_precompute_args(digits_dir, teacher_ckpt, tmp_path / "one", rounds)],
                   env=ENV, check=True, capture_output=True, timeout=300)
    assert_same_stores(tmp_path / "two", tmp_path / "one")


# ---------------------------------------------------------------- distill

def record_steps(job):
    """Wrap the job's teacher and loss so every step's teacher logits and loss are kept."""
    teacher_calls, losses = [], []
    teacher_logits, loss_fn = job.teacher.logits, job.loss.__call__

    def logits(*args):
        out = teacher_logits(*args)
        teacher_calls.append(out.clone())
        return out

    class Recorded(type(job.loss)):
        def __call__(self, *args):
            loss, parts = loss_fn(*args)
            losses.append(loss.item())
            return loss, parts

    job.teacher.logits = logits
    job.loss.__class__ = Recorded
    return teacher_calls, losses


def test_cached_and_online_see_the_same_teacher_logits_and_losses(digits_dir, teacher_ckpt, crld_store, tmp_path):
    runs = {}
    for mode in ("cached", "online"):
        cfg = DistillConfig(student="resnet8", loss="crld", data_dir=digits_dir, out=tmp_path / mode,
                            recipe=make_recipe("resnet8", epochs=2, batch_size=64, lr=0.01, seed=3), store=crld_store.path,
                            teacher_mode=mode, teacher="resnet8", ckpt=teacher_ckpt, device="cpu", show_progress=False)
        job = build_job(cfg)
        runs[mode] = (*record_steps(job), fit(job))
    cached_logits, cached_losses, cached_hist = runs["cached"]
    online_logits, online_losses, online_hist = runs["online"]
    steps_per_epoch = 1438 // 64
    assert len(cached_logits) == len(online_logits) == 2 * 2 * steps_per_epoch  # 2 epochs x 2 views
    for zc, zo in zip(cached_logits, online_logits):
        # float16 storage: relative rounding 2^-11, plus float noise of other batch compositions.
        torch.testing.assert_close(zc, zo, rtol=2**-10, atol=1e-3)
    # Loss curves: equal at the start; SGD then slowly amplifies the float16 rounding.
    a, b = np.array(cached_losses[:steps_per_epoch]), np.array(online_losses[:steps_per_epoch])
    rel = np.abs(a - b) / np.abs(b)
    assert rel[:4].max() < 1e-3 and rel.mean() < 1e-2 and rel.max() < 5e-2, rel
    assert abs(cached_hist[-1]["test_top1"] - online_hist[-1]["test_top1"]) < 3.0
    assert [r["round"] for r in cached_hist] == [0, 1]


def test_kd_student_cycles_rounds_when_epochs_exceed_them(digits_dir, crld_store, tmp_path):
    cfg = DistillConfig(student="resnet8", loss="kd", data_dir=digits_dir, out=tmp_path / "kd",
                        recipe=make_recipe("resnet8", epochs=3, batch_size=128), store=crld_store.path,
                        device="cpu", show_progress=False)
    history = fit(build_job(cfg))
    assert [r["round"] for r in history] == [0, 1, 0]
    assert all(np.isfinite(r["train_loss"]) and r["train_kd"] > 0 for r in history)
    cfg.rounds, cfg.out, cfg.recipe = 1, tmp_path / "kd1", make_recipe("resnet8", epochs=2, batch_size=128)
    job = build_job(cfg)
    assert job.info["store_rounds"] == 1 and [r["round"] for r in fit(job)] == [0, 0]
    cfg.rounds = 3
    with pytest.raises(KdcacheError, match="--rounds must be between 1 and the store's 2 rounds"):
        build_job(cfg)


def test_distill_rejects_a_store_from_other_data_or_without_the_views(digits_dir, teacher_ckpt, crld_store, tmp_path):
    from kdcache.data import prepare_dataset

    other = prepare_dataset("digits", tmp_path / "digits20", size=20)
    cfg = DistillConfig(student="resnet8", loss="kd", data_dir=tmp_path / "digits20", out=tmp_path / "x",
                        recipe=make_recipe("resnet8", epochs=1), store=crld_store.path, device="cpu")
    with pytest.raises(KdcacheError, match="other data"):
        build_job(cfg)
    assert other.num_classes == 10
    weak_only = precompute(precompute_cfg(digits_dir, teacher_ckpt, tmp_path / "weak", rounds=1,
                                          views={"weak": "weak"}), progress=False)
    cfg = DistillConfig(student="resnet8", loss="crld", data_dir=digits_dir, out=tmp_path / "y",
                        recipe=make_recipe("resnet8", epochs=1), store=weak_only.path, device="cpu")
    with pytest.raises(KdcacheError, match="--views weak,strong"):
        build_job(cfg)


def test_distill_finds_the_default_store(digits_dir, teacher_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_HOME", str(tmp_path / "home"))
    cfg = DistillConfig(student="resnet8", loss="kd", data_dir=digits_dir, out=tmp_path / "r",
                        recipe=make_recipe("resnet8", epochs=1), device="cpu")
    with pytest.raises(KdcacheError, match="run `kdcache precompute` first"):
        build_job(cfg)
    store = precompute(precompute_cfg(digits_dir, teacher_ckpt, None, rounds=1), progress=False)
    assert store.path.parent == tmp_path / "home" / "stores"
    assert build_job(cfg).info["store"] == str(store.path)
    precompute(precompute_cfg(digits_dir, teacher_ckpt, None, rounds=1, seed=5), progress=False)
    with pytest.raises(KdcacheError, match="several stores"):
        build_job(cfg)


def test_two_process_distill_trains_on_disjoint_shards(digits_dir, crld_store, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29523",
                "-m", "kdcache.cli"]
    args = ["distill", "--student", "resnet8", "--loss", "kd", "--store", str(crld_store.path), "--data", str(digits_dir),
            "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--out", str(tmp_path / "ddp"), "--quiet"]
    result = subprocess.run([*torchrun, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # rank 0 alone writes
    import json

    record = json.loads(lines[0])
    # Each of the 2 ranks runs 1438 // 2 // 64 = 11 steps of 64: the epoch covers 1408 samples.
    assert record["train_samples"] == 2 * (1438 // 2 // 64) * 64
    assert record["train_images_per_s"] > 0 and 0.0 <= record["test_top1"] <= 100.0
    assert read_checkpoint(tmp_path / "ddp" / "last.pth")["epoch"] == 1


def test_verify_bounds_follow_bf16_steps_of_each_rows_largest_logit():
    from kdcache.precompute import verify_bounds

    fresh = torch.tensor([[47.2, -3.0, 0.5], [0.8, -0.2, 0.1]])
    # bf16: two steps of the largest |logit| (one step is 0.25 at 47.2, as measured on an H100), floor 5e-2.
    assert torch.allclose(verify_bounds(fresh, "bf16", 0.01, None), torch.tensor([0.01 + 47.2 / 64, 0.06]))
    assert torch.allclose(verify_bounds(fresh, "fp32", 0.0, None), torch.tensor([1e-3, 1e-3]))
    assert torch.allclose(verify_bounds(fresh, "bf16", 0.0, 0.3), torch.tensor([0.3, 0.3]))  # an explicit --tolerance
