"""Hostile inputs for data, training, report and views commands (issue 14).

Every corpus case must exit 1 with one `error:` line naming the cause, no traceback,
and leave every file under the test's folder exactly as it was: nothing deleted,
nothing replaced, nothing half-written. Cases run the CLI entry point in-process (an
exception other than KdcacheError fails the test as a traceback would); one case that
depends on the environment at import time runs a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdcache.cli.app import main
from kdcache.data import prepare_dataset
from kdcache.distill import DistillConfig, distill
from kdcache.errors import KdcacheError
from kdcache.locks import FileLock
from kdcache.models import create_model, read_checkpoint, save_checkpoint
from kdcache.outputs import write_text_atomic
from kdcache.precompute import PrecomputeConfig, precompute
from kdcache.recipes import make_recipe


def run_main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for folders); lock files' pid text is ignored."""
    return {str(p.relative_to(root)): (None if p.is_dir() or p.name == ".lock" else p.read_bytes())
            for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def trained_run(digits_dir, tmp_path_factory) -> Path:
    """A 1-epoch CE run of resnet8 on digits with the default (scaled) LR milestones."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    distill(DistillConfig(student="resnet8", loss="ce", data_dir=digits_dir, out=out,
                          recipe=make_recipe("resnet8", epochs=1), device="cpu", show_progress=False))
    return out


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "digits-700"
    prepare_dataset("digits", out, size=16, max_train=700)
    return out


def user_folder(path: Path) -> None:
    (path / "sub").mkdir(parents=True)
    (path / "important.txt").write_text("do not delete")
    (path / "sub" / "thesis.tex").write_text("\\section{results}")


def npz_source(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", x_train=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
             y_train=np.arange(40) % 4, x_test=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
             y_test=np.arange(8) % 4)


def data_copy(tmp: Path, fx: dict, edit=None) -> None:
    shutil.copytree(fx["data"], tmp / "data")
    if edit is not None:
        edit(tmp / "data", fx)


def with_meta(**changes):
    def edit(data: Path, fx: dict) -> None:
        meta = json.loads((data / "meta.json").read_text())
        (data / "meta.json").write_text(json.dumps({**meta, **changes}))
    return edit


def swap_train_beton(data: Path, fx: dict) -> None:
    shutil.copy(fx["other_data"] / "train.beton", data / "train.beton")


def run_copy(tmp: Path, fx: dict) -> None:
    shutil.copytree(fx["run"], tmp / "run")


def locked_run(tmp: Path, fx: dict) -> None:
    run_copy(tmp, fx)
    lock = FileLock(tmp / "run" / ".lock")  # held until the test ends, as a running process would
    assert lock.try_acquire()
    fx["held"].append(lock)


def yaml_config(text: str):
    def setup(tmp: Path, fx: dict) -> None:
        (tmp / "recipe.yaml").write_text(text)
    return setup


def file_with(name: str, data: bytes):
    def setup(tmp: Path, fx: dict) -> None:
        (tmp / name).write_bytes(data)
    return setup


TRAIN = ["train", "--model", "resnet8", "--data", "{data}", "--out", "{tmp}/new", "--epochs", "1", "--device", "cpu"]
RESUME = ["train", "--model", "resnet8", "--data", "{data}", "--out", "{tmp}/run", "--resume", "--epochs", "1"]
KD = ["distill", "--student", "resnet8", "--loss", "kd", "--data", "{data}", "--store", "{store}", "--device", "cpu"]

# id: (arguments, setup(tmp, fixtures) or None, text the error line must contain)
CORPUS = {
    # --- data loss
    "prepare --overwrite of a user folder": (
        ["data", "prepare", "digits", "--size", "16", "--out", "{tmp}/out", "--overwrite"],
        lambda tmp, fx: user_folder(tmp / "out"), "refusing to replace"),
    "prepare --overwrite of a file": (
        ["data", "prepare", "digits", "--size", "16", "--out", "{tmp}/notes.txt", "--overwrite"],
        file_with("notes.txt", b"mine"), "is a file"),
    "prepare --overwrite of the source's folder": (
        ["data", "prepare", "npz", "--root", "{tmp}/src/data.npz", "--out", "{tmp}/src", "--overwrite"],
        lambda tmp, fx: npz_source(tmp / "src"), "contains the source"),
    "train into a folder with a user config.json": (
        [*TRAIN[:5], "--out", "{tmp}/mine", "--epochs", "1"],
        lambda tmp, fx: (tmp / "mine").mkdir() or (tmp / "mine" / "config.json").write_text('{"mine": 1}'),
        "refusing to use"),
    "train --out is a file": ([*TRAIN[:5], "--out", "{tmp}/notes.txt"], file_with("notes.txt", b"mine"), "is a file"),
    "report into a user folder": (
        ["report", "{tmp}/run", "--out", "{tmp}/out"],
        lambda tmp, fx: (run_copy(tmp, fx), user_folder(tmp / "out")), "did not write"),
    "views show over a user file": (
        ["views", "show", "--data", "{data}", "--out", "{tmp}/notes.txt"], file_with("notes.txt", b"mine"),
        "not a PNG"),
    "bench --out is a folder": (["bench", "--out", "{tmp}", "--steps", "1"], None, "is a directory"),
    # --- concurrent writers
    "second process on a run dir": ([*RESUME, "--epochs", "2"], locked_run, "in use by another kdcache process"),
    # --- resume must be the same run
    "resume with another lr": ([*RESUME, "--lr", "0.2"], run_copy, "recipe.lr="),
    "resume with another student": (["train", "--model", "resnet20", *RESUME[3:]], run_copy, "student="),
    "resume with other data": ([*RESUME[:4], "{other_data}", *RESUME[5:]], run_copy, "dataset_fingerprint="),
    "resume with another loss": ([*KD, "--out", "{tmp}/run", "--resume", "--epochs", "1"], run_copy, "loss="),
    "resume moving the LR milestones": ([*RESUME[:-1], "8"], run_copy, "recipe.lr_milestones="),
    # --- sizes bounded before allocating
    "distill --rounds 10^12": ([*KD, "--out", "{tmp}/new", "--rounds", "1000000000000"], None, "--rounds must be"),
    "train --epochs 10^12": ([*TRAIN[:-4], "--epochs", "1000000000000"], None, "epochs must be"),
    "train --batch-size 10^12": ([*TRAIN, "--batch-size", "1000000000000"], None, "larger than the training split"),
    "train --seed 2^64": ([*TRAIN, "--seed", str(2**64)], None, "seed must be"),
    # --- bad values
    "--device tpu": ([*TRAIN[:-2], "--device", "tpu"], None, "--device 'tpu'"),
    "--device cuda:x": ([*TRAIN[:-2], "--device", "cuda:x"], None, "--device 'cuda:x'"),
    "--device meta": ([*TRAIN[:-2], "--device", "meta"], None, "--device 'meta'"),
    "--device cpu:1": ([*TRAIN[:-2], "--device", "cpu:1"], None, "--device 'cpu:1'"),
    "--data is a file": (["train", "--model", "resnet8", "--data", "{tmp}/notes.txt", "--out", "{tmp}/new"],
                         file_with("notes.txt", b"mine"), "is a file"),
    "negative --lr": ([*TRAIN, "--lr", "-1"], None, "lr must be a positive number"),
    "NaN --weight-decay": ([*TRAIN, "--weight-decay", "nan"], None, "weight_decay must be"),
    "--lr-decay-epochs 5,2,-1": ([*TRAIN, "--lr-decay-epochs", "5,2,-1"], None, "lr_decay_epochs must be"),
    "bf16 on CPU": ([*TRAIN, "--precision", "bf16"], None, "bf16 runs on CUDA only"),
    "YAML epochs: ten": ([*TRAIN[:-4], "--config", "{tmp}/recipe.yaml"], yaml_config("epochs: ten\n"), "epochs must be"),
    "YAML loss_params: 3": ([*TRAIN, "--config", "{tmp}/recipe.yaml"], yaml_config("loss_params: 3\n"),
                            "loss_params must be a mapping"),
    "YAML lr as a list": ([*TRAIN, "--config", "{tmp}/recipe.yaml"], yaml_config("lr: [0.1]\n"), "lr must be"),
    "YAML a list": ([*TRAIN, "--config", "{tmp}/recipe.yaml"], yaml_config("- 1\n- 2\n"), "must be a mapping"),
    "YAML unknown key": ([*TRAIN, "--config", "{tmp}/recipe.yaml"], yaml_config("lrr: 0.1\n"), "unknown key 'lrr'"),
    "text file as a checkpoint": (["eval", "--model", "resnet8", "--data", "{data}", "--ckpt", "{tmp}/ckpt.pth"],
                                  file_with("ckpt.pth", b"not a checkpoint\n"), "cannot read checkpoint"),
    "random bytes as a checkpoint": (["eval", "--model", "resnet8", "--data", "{data}", "--ckpt", "{tmp}/ckpt.pth"],
                                     file_with("ckpt.pth", np.random.default_rng(0).bytes(4096)),
                                     "cannot read checkpoint"),
    "std 0 in meta.json": ([*TRAIN[:3], "--data", "{tmp}/data", *TRAIN[5:]],
                           lambda tmp, fx: data_copy(tmp, fx, with_meta(std=[0.0, 0.2, 0.2])), "std must be positive"),
    "betons swapped under a copied meta.json": ([*TRAIN[:3], "--data", "{tmp}/data", *TRAIN[5:]],
                                                lambda tmp, fx: data_copy(tmp, fx, swap_train_beton), "content check"),
    "--rounds without a store": (["distill", "--student", "resnet8", "--loss", "kd", "--teacher-mode", "online",
                                  "--teacher", "resnet8", "--ckpt", "{ckpt}", "--data", "{data}", "--out", "{tmp}/new",
                                  "--rounds", "3"], None, "--rounds selects rounds"),
    "bench --steps 0": (["bench", "--steps", "0", "--out", "{tmp}/b.json"], None, "--steps must be"),
    "bench batch larger than its samples": (["bench", "--samples", "16", "--batch-size", "64", "--out", "{tmp}/b.json"],
                                            None, "--batch-size must lie in"),
}


@pytest.mark.parametrize("args, setup, message", CORPUS.values(), ids=CORPUS.keys())
def test_hostile_input_is_one_line_and_touches_nothing(args, setup, message, tmp_path, digits_dir, teacher_ckpt,
                                                       trained_run, other_data, weak_store):
    fx = {"data": digits_dir, "other_data": other_data, "run": trained_run, "held": []}
    if setup is not None:
        setup(tmp_path, fx)
    before = snapshot(tmp_path)
    try:
        code, _, err = run_main(*(a.format(tmp=tmp_path, data=digits_dir, other_data=other_data, ckpt=teacher_ckpt,
                                           store=weak_store) for a in args))
    finally:
        for lock in fx["held"]:
            lock.release()
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert snapshot(tmp_path) == before


def test_corpus_size():
    """The closing note of issue 14 quotes this count with the store corpus's."""
    assert len(CORPUS) >= 35


def test_kdcache_home_that_is_a_file(tmp_path):
    (tmp_path / "home").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "kdcache.cli", "info", str(tmp_path)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "KDCACHE_HOME": str(tmp_path / "home")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: KDCACHE_HOME={tmp_path / 'home'} is a file; "
                                                  "point it to a directory (or unset it)"]


# ---------------------------------------------------------------- resume after a store changed

def test_resume_refuses_a_store_overwritten_by_another_teacher(digits_dir, teacher_ckpt, tmp_path):
    ckpt = read_checkpoint(teacher_ckpt)
    other = create_model("resnet8", 10)
    other.load_state_dict({k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()})
    save_checkpoint(tmp_path / "other.pth", other)

    def store_from(teacher: Path, overwrite: bool) -> None:
        precompute(PrecomputeConfig(teacher="resnet8", ckpt=teacher, data_dir=digits_dir, views={"weak": "weak"},
                                    rounds=1, out=tmp_path / "store", device="cpu", overwrite=overwrite),
                   progress=False)

    store_from(teacher_ckpt, overwrite=False)
    args = [*(a.format(data=digits_dir, store=tmp_path / "store") for a in KD), "--out", str(tmp_path / "run"),
            "--epochs", "1", "--lr-decay-epochs", "5", "--quiet"]
    assert run_main(*args)[0] == 0
    store_from(tmp_path / "other.pth", overwrite=True)
    before = snapshot(tmp_path / "run")
    code, _, err = run_main(*args[:-5], "--epochs", "2", "--lr-decay-epochs", "5", "--resume", "--quiet")
    assert code == 1 and "store_identity.teacher_sha256=" in err, err
    assert snapshot(tmp_path / "run") == before


def test_resume_may_extend_epochs_when_the_milestones_stay(digits_dir, tmp_path):
    args = [*(a.format(tmp=tmp_path, data=digits_dir) for a in TRAIN[:-4]), "--lr-decay-epochs", "5", "--quiet"]
    assert run_main(*args, "--epochs", "1")[0] == 0
    code, _, err = run_main(*args, "--epochs", "2", "--resume")
    assert code == 0, err
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["recipe"]["epochs"] == 2 and config["epochs_extended"] == [{"at_epoch": 1, "from": 1, "to": 2}]
    assert len((tmp_path / "new" / "metrics.jsonl").read_text().splitlines()) == 2


# ---------------------------------------------------------------- leftovers of killed runs

def test_prepare_removes_what_a_killed_prepare_left(tmp_path):
    dead = tmp_path / ".out.tmp-deadbeef"
    dead.mkdir()
    (dead / ".lock").write_text("12345\n")  # no process holds it any more
    (dead / "train.beton").write_bytes(b"partial")
    busy = tmp_path / ".out.tmp-0badcafe"  # a prepare still running: its lock is held
    busy.mkdir()
    lock = FileLock(busy / ".lock")
    assert lock.try_acquire()
    try:
        prepare_dataset("digits", tmp_path / "out", size=8, max_train=50, max_test=20)
    finally:
        lock.release()
    assert not dead.exists() and busy.exists() and (tmp_path / "out" / "meta.json").is_file()


def test_resume_removes_checkpoint_temporaries_and_starts_a_run_killed_before_its_first_checkpoint(
        trained_run, digits_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / ".last.pth.x1y2.tmp").write_bytes(b"half a checkpoint")
    for name in ("last.pth", "best.pth"):
        (run / name).unlink()  # as if killed inside the first last.pth write
    code, _, err = run_main(*(a.format(tmp=tmp_path, data=digits_dir) for a in RESUME), "--quiet")
    assert code == 0, err
    assert "no last.pth yet" in err
    assert not list(run.glob("*.tmp")) and read_checkpoint(run / "last.pth")["epoch"] == 1


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    target.write_text("old")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(KdcacheError, match="No space left on device"):
        write_text_atomic(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]

