"""Hostile inputs for precompute, info and verify (issue 14), through the real CLI.

Every corpus case runs `python -m kdcache.cli` in a subprocess and must exit non-zero
with exactly one `error:` line on stderr naming the cause, no traceback, and leave every
file under the test's folder as it was: no store created, none changed or half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zarr

from kdcache.errors import KdcacheError
from kdcache.storage import LogitStore, slab_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdcache.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=300, **kwargs)


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every path under root with its bytes (None for folders) and modification time."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------- setups: (tmp, fixtures) -> None

def store_copy(edit=None):
    def setup(tmp: Path, fx: dict) -> None:
        shutil.copytree(fx["store"], tmp / "store")
        if edit is not None:
            edit(tmp / "store")
    return setup


def root_attrs(**changes):
    return store_copy(lambda store: zarr.open_group(store, mode="r+").update_attributes(changes))


def first_chunk(store: Path, array: str = "logits") -> Path:
    folder = store / slab_path(0, "weak")
    chunks = json.loads((folder / "zarr.json").read_text())["attributes"]["chunks"]
    return folder / next(name for name in chunks if name.startswith(array + "/"))


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def write(relative: str, data: bytes):
    def setup(tmp: Path, fx: dict) -> None:
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp / relative).write_bytes(data)
    return setup


def user_folder(tmp: Path, fx: dict) -> None:
    (tmp / "store" / "sub").mkdir(parents=True)
    (tmp / "store" / "important.txt").write_text("do not delete")


def data_with_meta(**changes):
    def setup(tmp: Path, fx: dict) -> None:
        shutil.copytree(fx["data"], tmp / "data")
        meta = json.loads((tmp / "data" / "meta.json").read_text())
        (tmp / "data" / "meta.json").write_text(json.dumps({**meta, **changes}))
    return setup


def format_2_topk(store: Path) -> None:
    """Mark the store as a format 2 top-k store (float32 values), which this kdcache only reads."""
    root = zarr.open_group(store, mode="r+")
    root.update_attributes({"kdcache_store_format": 2, "identity": {**root.attrs["identity"], "encoding": "topk:3"}})


def store_and_other_ckpt(tmp: Path, fx: dict) -> None:
    store_copy()(tmp, fx)
    (tmp / "t.pth").write_bytes(fx["ckpt"].read_bytes() + b"\0")


def interrupted_store(tmp: Path, fx: dict) -> None:
    """The store with its one slab as a killed writer leaves it: no completion marker."""
    store_copy(lambda s: zarr.open_group(s / slab_path(0, "weak"), mode="r+").update_attributes(
        {"complete": False}))(tmp, fx)


# ---------------------------------------------------------------- the corpus

PRECOMPUTE = ["precompute", "--teacher", "resnet8", "--ckpt", "{ckpt}", "--data", "{data}", "--views", "weak",
              "--rounds", "1", "--out", "{tmp}/store", "--device", "cpu", "--quiet"]
VERIFY = ["verify", "{tmp}/store", "--ckpt", "{ckpt}", "--data", "{data}", "--device", "cpu", "--quiet"]

CORPUS = {
    # name: (arguments, setup or None, words of the one error line)
    "batch size 0": ([*PRECOMPUTE, "--batch-size", "0"], None, "--batch-size must be at least 1, got 0"),
    "batch size -5": ([*PRECOMPUTE, "--batch-size", "-5"], None, "--batch-size must be at least 1"),
    "seed -1": ([*PRECOMPUTE, "--seed", "-1"], None, "--seed must be between 0 and 2^64-1"),
    "seed 2^64": ([*PRECOMPUTE, "--seed", str(2**64)], None, "--seed must be between 0 and 2^64-1"),
    "seed 10^30": ([*PRECOMPUTE, "--seed", str(10**30)], None, "--seed must be between 0 and 2^64-1"),
    "rounds 0": ([*PRECOMPUTE, "--rounds", "0"], None, "--rounds must be between 1 and 100000"),
    "rounds -3": ([*PRECOMPUTE, "--rounds", "-3"], None, "--rounds must be between 1 and 100000"),
    "rounds 10^12": ([*PRECOMPUTE, "--rounds", "1000000000000"], None, "--rounds must be between 1 and 100000"),
    "encoding topk:11 of 10 classes": ([*PRECOMPUTE, "--encoding", "topk:11"], None,
                                       "topk:11 needs k < the number of classes (10)"),
    "encoding topk:10 of 10 classes": ([*PRECOMPUTE, "--encoding", "topk:10"], None, "needs k < the number"),
    "encoding topk:0": ([*PRECOMPUTE, "--encoding", "topk:0"], None, "topk needs k >= 1"),
    "encoding topk:": ([*PRECOMPUTE, "--encoding", "topk:"], None, "unknown encoding 'topk:'"),
    "encoding bf8": ([*PRECOMPUTE, "--encoding", "bf8"], None, "unknown encoding 'bf8'"),
    "precision fp8": ([*PRECOMPUTE, "--precision", "fp8"], None, "--precision must be auto, fp32 or bf16"),
    "views empty": ([*PRECOMPUTE, "--views", ""], None, "empty view slot"),
    "views twice": ([*PRECOMPUTE, "--views", "weak,weak"], None, "given twice"),
    "views unknown policy": ([*PRECOMPUTE, "--views", "weak=nosuch"], None, "nosuch"),
    "views path slot": ([*PRECOMPUTE, "--views", "../up=weak"], None, "letters, digits"),
    "views zarr.json slot": ([*PRECOMPUTE, "--views", "zarr.json=weak"], None, "letters, digits"),
    "views 65 slots": ([*PRECOMPUTE, "--views", ",".join(f"s{i}=weak" for i in range(65))], None, "1 to 64"),
    "missing checkpoint": ([*PRECOMPUTE, "--ckpt", "{tmp}/no.pth"], None, "no.pth not found"),
    "text checkpoint": ([*PRECOMPUTE, "--ckpt", "{tmp}/t.pth"], write("t.pth", b"not a checkpoint\n"), "t.pth"),
    "unknown teacher": ([*PRECOMPUTE, "--teacher", "nosuch"], None, "unknown model 'nosuch'"),
    "data is a file": ([*PRECOMPUTE, "--data", "{tmp}/d"], write("d", b"x"), "is a file"),
    "data missing": ([*PRECOMPUTE, "--data", "{tmp}/nodata"], None, "nodata/meta.json"),
    "std 0 in meta.json": ([*PRECOMPUTE, "--data", "{tmp}/data"], data_with_meta(std=[0.0, 0.2, 0.2]),
                           "std must be positive"),
    "out is a file": (PRECOMPUTE, write("store", b"mine"), "exists and is not a kdcache store"),
    "out is a user folder": (PRECOMPUTE, user_folder, "exists and is not a kdcache store"),
    "overwrite a user folder": ([*PRECOMPUTE, "--overwrite"], user_folder, "refusing to overwrite"),
    "store of another seed": ([*PRECOMPUTE, "--seed", "7"], store_copy(), "store_seed=0, this run has store_seed=7"),
    "store of another encoding": ([*PRECOMPUTE, "--encoding", "int8"], store_copy(), "encoding=\"float16\""),
    "store of format 1": (PRECOMPUTE, root_attrs(kdcache_store_format=1), "store format 1"),
    "store of format 99": (PRECOMPUTE, root_attrs(kdcache_store_format=99), "upgrade kdcache"),
    "top-k store of format 2": ([*PRECOMPUTE, "--encoding", "topk:3"], store_copy(format_2_topk),
                                "store format 2, whose top-k values are float32"),
    "store with garbage zarr.json": (PRECOMPUTE, store_copy(lambda s: (s / "zarr.json").write_text("{garbage")),
                                     "zarr.json is unreadable"),
    "store with damaged rounds": (PRECOMPUTE, root_attrs(rounds="3"), "damaged root attribute 'rounds'"),
    "info of a missing path": (["info", "{tmp}/none"], None, "no logit store at"),
    "info of a file": (["info", "{tmp}/f"], write("f", b"x"), "not a kdcache logit store"),
    "info of a user folder": (["info", "{tmp}/store"], user_folder, "not a kdcache logit store"),
    "info of garbage zarr.json": (["info", "{tmp}/store"], store_copy(lambda s: (s / "zarr.json").write_bytes(b"\xff")),
                                  "zarr.json is unreadable"),
    "info of format 1": (["info", "{tmp}/store"], root_attrs(kdcache_store_format=1), "store format 1"),
    "info of damaged identity": (["info", "{tmp}/store"], root_attrs(identity=[]), "damaged root attribute 'identity'"),
    "info --check of a garbled chunk": (["info", "{tmp}/store", "--check"],
                                        store_copy(lambda s: garble(first_chunk(s))), "1 damaged slab(s)"),
    "info --check of garbled seeds": (["info", "{tmp}/store", "--check"],
                                      store_copy(lambda s: garble(first_chunk(s, "seeds"))), "1 damaged slab(s)"),
    "verify samples 0": ([*VERIFY, "--samples", "0"], store_copy(), "--samples must be at least 1, got 0"),
    "verify samples -3": ([*VERIFY, "--samples", "-3"], store_copy(), "--samples must be at least 1"),
    "verify tolerance nan": ([*VERIFY, "--tolerance", "nan"], store_copy(), "--tolerance must be a finite number"),
    "verify tolerance -1": ([*VERIFY, "--tolerance", "-1"], store_copy(), "--tolerance must be a finite number"),
    "verify tolerance inf": ([*VERIFY, "--tolerance", "inf"], store_copy(), "--tolerance must be a finite number"),
    "verify a deleted chunk": (VERIFY, store_copy(lambda s: first_chunk(s).unlink()), "is missing"),
    "verify a truncated chunk": (VERIFY, store_copy(lambda s: first_chunk(s).write_bytes(b"\0" * 3)), "has 3 bytes"),
    "verify a garbled chunk": (VERIFY, store_copy(lambda s: garble(first_chunk(s))), "checksum"),
    "verify garbage array zarr.json": (VERIFY, store_copy(
        lambda s: (s / slab_path(0, "weak") / "logits" / "zarr.json").write_text("[")), "is damaged"),
    "verify another checkpoint": ([*VERIFY, "--ckpt", "{tmp}/t.pth"], store_and_other_ckpt, "sha256 differs"),
    "verify a store with no slab": (VERIFY, interrupted_store, "no complete slab to verify"),
}


@pytest.fixture(scope="module")
def corpus_results(digits_dir, teacher_ckpt, weak_store, tmp_path_factory) -> dict[str, tuple]:
    """name -> (completed process, folder untouched) of every case; the CLI runs of the
    cases overlap, as each is mostly interpreter start-up."""
    fx = {"data": digits_dir, "ckpt": teacher_ckpt, "store": weak_store}
    folders = {}
    for name, (_, setup, _) in CORPUS.items():
        folders[name] = tmp_path_factory.mktemp("case")
        if setup is not None:
            setup(folders[name], fx)

    def run(name: str) -> tuple:
        tmp, before = folders[name], snapshot(folders[name])
        result = cli(*(a.format(tmp=tmp, data=digits_dir, ckpt=teacher_ckpt) for a in CORPUS[name][0]))
        return result, snapshot(tmp) == before

    data_before = snapshot(digits_dir)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2)) as pool:
        results = dict(zip(CORPUS, pool.map(run, CORPUS)))
    assert snapshot(digits_dir) == data_before
    return results


@pytest.mark.parametrize("name", CORPUS)
def test_hostile_input_is_one_line_and_touches_nothing(name, corpus_results):
    result, untouched = corpus_results[name]
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and CORPUS[name][2] in lines[0], result.stderr
    assert untouched, "the command changed files"


def test_corpus_size():
    assert len(CORPUS) >= 50


# ---------------------------------------------------------------- beyond the corpus

def test_precompute_repairs_what_info_reports_damaged(digits_dir, teacher_ckpt, weak_store, tmp_path):
    shutil.copytree(weak_store, tmp_path / "store")
    first_chunk(tmp_path / "store").unlink()
    garble(first_chunk(tmp_path / "store", "seeds"))  # the same slab, also a bad checksum
    result = cli("info", str(tmp_path / "store"))
    assert result.returncode == 0, result.stderr
    assert "slabs complete 0/1" in result.stdout and "damaged      round 0 view weak: chunk file" in result.stdout
    args = [a.format(tmp=tmp_path, data=digits_dir, ckpt=teacher_ckpt) for a in PRECOMPUTE]
    result = cli(*args)
    assert result.returncode == 0 and "1/1 slabs complete" in result.stdout, result.stderr
    assert cli("info", str(tmp_path / "store"), "--check").returncode == 0
    repaired, original = LogitStore.open(tmp_path / "store"), LogitStore.open(weak_store)
    assert repaired.slab(0, "weak").equal(original.slab(0, "weak"))
    assert repaired.seeds(0, "weak").equal(original.seeds(0, "weak"))


def test_precompute_rounds_1_keeps_a_3_round_store(digits_dir, teacher_ckpt, weak_store, tmp_path):
    shutil.copytree(weak_store, tmp_path / "store")
    zarr.open_group(tmp_path / "store", mode="r+").update_attributes({"rounds": 3})
    result = cli(*[a.format(tmp=tmp_path, data=digits_dir, ckpt=teacher_ckpt) for a in PRECOMPUTE])
    assert result.returncode == 0, result.stderr
    assert "1/3 slabs complete" in result.stdout
    assert LogitStore.open(tmp_path / "store").rounds == 3


def test_bf16_on_cpu_warns_and_records_fp32(digits_dir, teacher_ckpt, tmp_path):
    args = [a.format(tmp=tmp_path, data=digits_dir, ckpt=teacher_ckpt) for a in PRECOMPUTE]
    result = cli(*args, "--precision", "bf16")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ("warning: --precision bf16 runs on CUDA only; this run on cpu uses fp32 "
                                     "(each slab records the precision it was computed in)")
    assert LogitStore.open(tmp_path / "store").slab_stats(0, "weak")["precision"] == "fp32"


def test_verify_samples_are_bounded_by_the_stored_views(digits_dir, teacher_ckpt, weak_store):
    result = cli("verify", str(weak_store), "--ckpt", str(teacher_ckpt), "--data", str(digits_dir), "--device", "cpu",
                 "--samples", "1000000000")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1438 views:") and result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("damage", ["deleted", "garbled"])
def test_distill_from_a_damaged_slab_stops_with_one_line(damage, digits_dir, weak_store, tmp_path):
    shutil.copytree(weak_store, tmp_path / "store")
    chunk = first_chunk(tmp_path / "store")
    chunk.unlink() if damage == "deleted" else garble(chunk)
    result = cli("distill", "--student", "resnet8", "--loss", "kd", "--store", str(tmp_path / "store"), "--data",
                 str(digits_dir), "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "precompute" in lines[0], result.stderr


def precompute_proc(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdcache.cli", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_precomputes_on_one_store_share_its_slabs(digits_dir, teacher_ckpt, weak_store, tmp_path):
    args = [a.format(tmp=tmp_path, data=digits_dir, ckpt=teacher_ckpt) for a in PRECOMPUTE] + ["--rounds", "6"]
    procs = [precompute_proc(args) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    for code, out, err in results:
        assert code == 0 and "Traceback" not in err, err[-2000:]
        assert "6/6 slabs complete" in out
    store = LogitStore.open(tmp_path / "store")
    assert store.damaged_slabs(deep=True) == [] and store.missing_slabs() == []
    assert store.slab(0, "weak").equal(LogitStore.open(weak_store).slab(0, "weak"))


def test_ctrl_c_is_one_line_and_leaves_a_resumable_store(digits_dir, teacher_ckpt, tmp_path):
    args = [a.format(tmp=tmp_path, data=digits_dir, ckpt=teacher_ckpt) for a in PRECOMPUTE] + ["--rounds", "12"]
    proc = precompute_proc(args)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if LogitStore.open(tmp_path / "store").complete_slabs():
                break
        except KdcacheError:  # not created yet
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    code, (out, err) = proc.wait(timeout=60), proc.communicate()
    assert code == 130, err[-2000:]
    assert err.strip() == "interrupted; rerun the same command to resume"
    store = LogitStore.open(tmp_path / "store")
    assert 1 <= len(store.complete_slabs()) < 12 and store.damaged_slabs(deep=True) == []
