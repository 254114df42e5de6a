"""The logit store: encodings, resume/identity rules, damage detection, locks, markers
under concurrency, prefetch."""

import errno
import json
import multiprocessing
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import kdcache.errors
from kdcache.errors import KdcacheError
from kdcache.locks import FileLock
from kdcache.losses import get_loss
from kdcache.storage import (
    STORE_FORMAT_VERSION,
    LogitStore,
    SlabPrefetcher,
    default_encoding,
    get_encoding,
    measure_encoding,
    slab_path,
    warn_if_loss_needs_full_logits,
)
from kdcache.storage.encodings import TopKEncoding

WEAK = {"name": "crop_flip", "params": {"pad": 4}}
IDENTITY = {
    "teacher": "resnet32x4",
    "checkpoint_sha256": "ab" * 32,
    "dataset_fingerprint": "cd" * 32,
    "policies": {"weak": WEAK},
    "store_seed": 7,
}
VIEWS = ["weak", "strong"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "store-format.md"


def make_logits(round, view, n, c):
    """Deterministic teacher-like logits and seeds for one slab (seeds span all 64 bits)."""
    g = torch.Generator().manual_seed(1000 * round + VIEWS.index(view))
    logits = torch.randn(n, c, generator=g) * torch.rand(n, 1, generator=g) * 8
    seeds = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g)
    return logits, seeds


def create(path, **overrides):
    kwargs = dict(identity=IDENTITY, num_samples=64, num_classes=10, rounds=3, views=VIEWS)
    kwargs.update(overrides)
    return LogitStore.create(path, **kwargs)


def write(store, round, view):
    logits, seeds = make_logits(round, view, store.num_samples, store.num_classes)
    store.write_slab(round, view, logits, seeds, {"teacher_acc": 0.5 + round / 100})
    return logits, seeds


# ---- encodings -----------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["float16", "int8", "topk:3"])
def test_round_trip(tmp_path, encoding):
    store = create(tmp_path / "s", encoding=encoding)
    logits, seeds = write(store, 1, "strong")
    store = LogitStore.open(tmp_path / "s")
    decoded = store.slab(1, "strong")
    assert decoded.dtype == torch.float32 and decoded.shape == (64, 10)
    assert torch.equal(store.seeds(1, "strong"), seeds)
    assert store.slab_stats(1, "strong") == {"teacher_acc": 0.51}
    if encoding == "float16":
        assert torch.equal(decoded, logits.half().float())
    elif encoding == "int8":
        half_step = (logits.max(1).values - logits.min(1).values) / 255 / 2
        assert ((decoded - logits).abs() <= half_step[:, None] * (1 + 1e-5) + 1e-6).all()
    else:
        top = logits.topk(3, dim=1).indices
        assert torch.equal(decoded.gather(1, top), logits.gather(1, top).half().float())
        rest = torch.ones_like(logits, dtype=torch.bool).scatter(1, top, False)
        # The top-k order survives, and the tail keeps the other classes' softmax mass at T=1.
        assert (decoded.gather(1, top).min(1).values >= decoded.masked_fill(~rest, -1e9).max(1).values).all()
        mass = logits.masked_fill(~rest, -torch.inf).logsumexp(1)
        assert torch.allclose(decoded.masked_fill(~rest, -torch.inf).logsumexp(1), mass, atol=1e-5)


def test_int8_handles_constant_rows():
    enc = get_encoding("int8")
    logits = np.full((2, 5), 3.25, dtype=np.float32)
    assert np.array_equal(enc.decode(enc.encode(logits), 5), logits)


@pytest.mark.parametrize(
    "encoding, num_classes, expected",
    [("float16", 100, 2 * 100 + 8), ("int8", 100, 100 + 8 + 8), ("topk", 100, 10 * 4 + 4 + 8),
     ("topk:20", 1000, 20 * 4 + 4 + 8)],
)
def test_bytes_per_view_sample_is_exact(tmp_path, encoding, num_classes, expected):
    store = create(tmp_path / "s", num_classes=num_classes, encoding=encoding)
    encoded = get_encoding(encoding).encode(make_logits(0, "weak", 64, num_classes)[0].numpy())
    per_row = sum(a.nbytes for a in encoded.values()) // 64 + 8
    assert store.info()["bytes_per_view_sample"] == per_row == expected


def test_default_encoding_is_topk_from_500_classes_within_5_percent_of_float16(tmp_path):
    assert default_encoding(10) == default_encoding(499) == "float16"
    assert default_encoding(500) == default_encoding(1000) == "topk:20"
    store = create(tmp_path / "s", num_classes=1000, encoding=default_encoding(1000))
    assert store.bytes_per_view_sample() <= 0.05 * 2 * 1000


def test_topk_keeps_order_of_constant_and_tied_rows():
    """The tail never rises above a kept value, even when float16 rounds that value down."""
    enc = get_encoding("topk:3")
    rows = np.array([[0.1] * 5, [0.3, 0.1, 0.1, 0.1, 0.1]], dtype=np.float32)
    decoded = enc.decode(enc.encode(rows), 5)
    assert np.array_equal(decoded[0], np.full(5, np.float16(0.1), np.float32))
    assert decoded[1, 0] == np.float16(0.3) and (decoded[1, 1:] <= np.float16(0.1)).all()


def test_topk_refuses_values_beyond_float16():
    with pytest.raises(KdcacheError, match="float16 range; use --encoding int8"):
        get_encoding("topk:2").encode(np.array([[1e6, 0, 0, 0]], dtype=np.float32))


def test_warns_once_when_a_loss_softens_beyond_top_k(capsys, monkeypatch):
    monkeypatch.setattr(kdcache.errors, "_warned", set())  # what earlier tests warned about
    softened = [get_loss(name) for name in ("kd", "dkd", "dist", "crld", "cmkd")]  # defaults: T=4
    at_t1 = [get_loss("ce"), get_loss("kd", T=1), get_loss("dkd", T=1), get_loss("dist", tau=1),
             get_loss("crld", T=1), get_loss("cmkd", T=1)]
    assert all(loss.needs_full_distribution for loss in softened)
    assert not any(loss.needs_full_distribution for loss in at_t1)
    for loss in softened + at_t1:
        warn_if_loss_needs_full_logits(loss, "float16")
        warn_if_loss_needs_full_logits(loss, "int8")
    for loss in at_t1:
        warn_if_loss_needs_full_logits(loss, "topk:20")
    assert capsys.readouterr().err == ""
    for _ in range(2):
        for loss in softened:
            warn_if_loss_needs_full_logits(loss, "topk:20")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(softened)
    assert lines[2].startswith("warning: loss 'dist' softens the teacher (tau=4)")
    assert all("beyond the top 20 logits this store keeps (topk:20)" in line for line in lines)


def test_unknown_encoding_and_float16_overflow(tmp_path):
    with pytest.raises(KdcacheError, match="unknown encoding 'bf8'"):
        create(tmp_path / "s", encoding="bf8")
    store = create(tmp_path / "s")
    huge = torch.full((64, 10), 1e6)
    with pytest.raises(KdcacheError, match="float16 range; use --encoding int8"):
        store.write_slab(0, "weak", huge, torch.zeros(64, dtype=torch.int64), {})
    assert not store.is_complete(0, "weak")


def test_errors_and_measure_encoding(tmp_path):
    store = create(tmp_path / "s")
    logits, _ = write(store, 0, "weak")
    errors = store.reconstruction_error(0, "weak", logits)
    assert errors["max_abs_error"] == float((logits - logits.half().float()).abs().max()) > 0
    assert 0 < errors["mean_kl_t1"] < 1e-5 and 0 < errors["mean_kl_t4"] < errors["mean_kl_t1"]
    # Against itself the stored slab has no error; int8 on the float32 source has more.
    assert store.reconstruction_error(0, "weak", store.slab(0, "weak"))["mean_kl_t1"] == 0
    int8 = store.measure_encoding(0, "weak", "int8", reference_logits=logits)
    assert int8 == measure_encoding(logits, "int8")
    assert int8["bytes_per_row"] == 18 and int8["max_abs_error"] > errors["max_abs_error"]


# ---- create / open -------------------------------------------------------------------


def test_recreate_with_same_identity_resumes(tmp_path):
    store = create(tmp_path / "s")
    logits, _ = write(store, 0, "strong")
    # The same identity in another key order, views as a tuple: still the same store.
    same = dict(reversed(list(IDENTITY.items())))
    resumed = create(
        tmp_path / "s", identity=same, views=tuple(VIEWS), rounds=4, attrs={"acc": 0.79}
    )
    assert resumed.complete_slabs() == [(0, "strong")]
    assert resumed.missing_slabs()[:3] == [(0, "weak"), (1, "weak"), (1, "strong")]
    assert len(resumed.missing_slabs()) == 7
    assert torch.equal(resumed.slab(0, "strong"), logits.half().float())
    reopened = LogitStore.open(tmp_path / "s")
    assert reopened.rounds == 4 and reopened.attrs == {"acc": 0.79}
    assert reopened.identity == {**IDENTITY, "encoding": "float16"}


@pytest.mark.parametrize(
    "change, field, old, new",
    [
        ({"identity": {**IDENTITY, "teacher": "wrn_40_2"}}, "teacher", "resnet32x4", "wrn_40_2"),
        (
            {"identity": {**IDENTITY, "policies": {"weak": {**WEAK, "params": {"pad": 2}}}}},
            "policies.weak.params.pad",
            "4",
            "2",
        ),
        ({"num_classes": 100}, "num_classes", "10", "100"),
        ({"views": ["weak"]}, "views", '["weak", "strong"]', '["weak"]'),
        ({"encoding": "int8"}, "encoding", "float16", "int8"),
    ],
)
def test_identity_mismatch_names_the_field(tmp_path, change, field, old, new):
    create(tmp_path / "s")
    with pytest.raises(KdcacheError) as info:
        create(tmp_path / "s", **change)
    message = str(info.value)
    assert f"with {field}=" in message and old in message and new in message
    assert "--overwrite" in message


def test_overwrite_replaces_store(tmp_path):
    store = create(tmp_path / "s")
    write(store, 0, "weak")
    fresh = create(tmp_path / "s", num_classes=100, overwrite=True)
    assert fresh.num_classes == 100 and fresh.complete_slabs() == []
    assert not (tmp_path / "s" / "slabs").exists()


def test_create_refuses_foreign_directories(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(KdcacheError, match="not a kdcache store"):
            create(tmp_path / "d", overwrite=overwrite)
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"


def test_open_errors(tmp_path):
    with pytest.raises(KdcacheError, match="no logit store at"):
        LogitStore.open(tmp_path / "missing")
    with pytest.raises(KdcacheError, match="not a kdcache logit store"):
        LogitStore.open(tmp_path)
    zarr.open_group(tmp_path / "plain", mode="w", attributes={"x": 1})
    with pytest.raises(KdcacheError, match="not a kdcache logit store"):
        LogitStore.open(tmp_path / "plain")
    create(tmp_path / "s")
    zarr.open_group(tmp_path / "s", mode="r+").update_attributes(
        {"kdcache_store_format": STORE_FORMAT_VERSION + 1}
    )
    with pytest.raises(KdcacheError, match="newer than this kdcache.*upgrade kdcache"):
        LogitStore.open(tmp_path / "s")


def test_read_only_and_key_errors(tmp_path):
    create(tmp_path / "s")
    store = LogitStore.open(tmp_path / "s")
    with pytest.raises(KdcacheError, match="read-only"):
        write(store, 0, "weak")
    with pytest.raises(KdcacheError, match="round 3 is out of range"):
        store.is_complete(3, "weak")
    with pytest.raises(KdcacheError, match="view 'mixed' is not in the store"):
        store.is_complete(0, "mixed")
    with pytest.raises(KdcacheError, match="not complete"):
        store.slab(0, "weak")


def test_interrupted_slab_is_ignored_then_rewritten(tmp_path):
    store = create(tmp_path / "s")
    # What a writer killed mid-slab leaves: a group and some data, no marker.
    group = zarr.open_group(tmp_path / "s", mode="r+").create_group(
        slab_path(2, "weak"), attributes={"complete": False}
    )
    group.create_array("logits", data=np.zeros((64, 10), np.float16))
    assert not LogitStore.open(tmp_path / "s").is_complete(2, "weak")
    assert (2, "weak") in store.missing_slabs()
    logits, _ = write(store, 2, "weak")
    assert torch.equal(LogitStore.open(tmp_path / "s").slab(2, "weak"), logits.half().float())
    with pytest.raises(ValueError, match="already complete"):
        write(store, 2, "weak")


def test_format_2_topk_store_is_read_not_extended(tmp_path, monkeypatch):
    """Format 2 kept top-k values in float32: such a store still decodes, but new slabs
    would be float16, so opening it for writing says to recompute it."""
    encode = TopKEncoding.encode

    def float32_values(self, logits):
        arrays = encode(self, logits)
        return {**arrays, "logits": np.take_along_axis(logits, arrays["indices"].astype(np.int64), axis=1)}

    store = create(tmp_path / "s", encoding="topk:3")
    monkeypatch.setattr(TopKEncoding, "encode", float32_values)
    logits, _ = write(store, 0, "weak")
    monkeypatch.undo()
    zarr.open_group(tmp_path / "s", mode="r+").update_attributes({"kdcache_store_format": 2})
    old = LogitStore.open(tmp_path / "s")
    top = logits.topk(3, dim=1).indices
    assert old.info()["format_version"] == 2
    assert torch.equal(old.slab(0, "weak").gather(1, top), logits.gather(1, top))
    for reopen in (lambda: LogitStore.open(tmp_path / "s", mode="r+"),
                   lambda: create(tmp_path / "s", encoding="topk:3")):
        with pytest.raises(KdcacheError, match="store format 2, whose top-k values are float32.*--overwrite"):
            reopen()


def test_format_2_dense_store_is_resumed(tmp_path):
    """float16 and int8 slabs are the same in formats 2 and 3."""
    create(tmp_path / "s", encoding="int8")
    zarr.open_group(tmp_path / "s", mode="r+").update_attributes({"kdcache_store_format": 2})
    store = create(tmp_path / "s", encoding="int8")
    write(store, 0, "weak")
    assert store.is_complete(0, "weak", deep=True) and store.info()["format_version"] == 2


# ---- reading with plain zarr and xarray -----------------------------------------------


@pytest.mark.parametrize("encoding, dims", [
    ("float16", {"logits": ("sample", "class"), "seeds": ("sample",)}),
    ("int8", {"logits": ("sample", "class"), "scale": ("sample",), "offset": ("sample",), "seeds": ("sample",)}),
    ("topk:3", {"logits": ("sample", "rank"), "indices": ("sample", "rank"), "tail": ("sample",),
                "seeds": ("sample",)}),
])
def test_xarray_opens_a_slab_with_named_dimensions(tmp_path, encoding, dims):
    store = create(tmp_path / "s", encoding=encoding)
    _, seeds = write(store, 1, "weak")
    slab = xr.open_zarr(tmp_path / "s", group=slab_path(1, "weak"), consolidated=False)
    assert {name: slab[name].dims for name in slab.data_vars} == dims
    assert slab.attrs["complete"] is True and slab.sizes["sample"] == 64
    assert np.array_equal(slab["seeds"].values, seeds.numpy().view(np.uint64))
    arrays = {name: slab[name].values for name in get_encoding(encoding).array_names}
    assert torch.equal(get_encoding(encoding).decode(arrays, 10), store.slab(1, "weak"))


@pytest.mark.parametrize("encoding", ["float16", "int8", "topk:3"])
def test_store_format_doc_examples_run(tmp_path, encoding, monkeypatch):
    """The reading examples of docs/store-format.md, run on a store with a slab in round 3:
    plain zarr for every encoding, xarray for float16."""
    section = DOCS.read_text().split("## Reading a store with plain zarr and xarray")[1]
    examples = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(examples) == 2
    store = create(tmp_path / "STORE", rounds=4, encoding=encoding)
    _, seeds = write(store, 3, "weak")
    monkeypatch.chdir(tmp_path)
    for example in examples if encoding == "float16" else examples[:1]:
        namespace = {}
        exec(example, namespace)
        assert np.array_equal(namespace["logits"], store.slab(3, "weak").numpy())
        assert np.array_equal(namespace["seeds"], seeds.numpy().view(np.uint64))


# ---- validation before writing ---------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"encoding": "topk:10"}, r"topk:10 needs k < the number of classes \(10\)"),
        ({"encoding": "topk:0"}, "topk needs k >= 1"),
        ({"encoding": "topk:x"}, "unknown encoding"),
        ({"views": ["weak", "weak"]}, "distinct names"),
        ({"views": ["../x"]}, "distinct names"),
        ({"views": ["zarr.json"]}, "distinct names"),
        ({"views": []}, "distinct names"),
        ({"views": [f"v{i}" for i in range(65)]}, "1 to 64"),
        ({"rounds": 0}, "rounds <= 100000"),
        ({"rounds": 10**12}, "rounds <= 100000"),
        ({"num_classes": 1}, "num_classes >= 2"),
    ],
)
def test_create_checks_everything_before_writing(tmp_path, change, message):
    with pytest.raises(KdcacheError, match=message):
        create(tmp_path / "s", **change)
    assert not (tmp_path / "s").exists()


def test_rounds_never_shrink(tmp_path):
    create(tmp_path / "s", rounds=3)
    assert create(tmp_path / "s", rounds=1).rounds == 3
    assert LogitStore.open(tmp_path / "s").rounds == 3
    assert create(tmp_path / "s", rounds=5).rounds == 5


# ---- damage --------------------------------------------------------------------------


def chunk_file(store, round=0, view="weak", array="logits"):
    folder = store.path / slab_path(round, view)
    return folder / next(name for name in json.loads((folder / "zarr.json").read_text())["attributes"]["chunks"]
                         if name.startswith(array + "/"))


def garble(path):
    """Same size, other bytes: only the chunk's checksum can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    # name: (array, how, seen by the quick size check, words of the reason)
    "chunk deleted": ("logits", lambda p: p.unlink(), True, "is missing"),
    "chunk truncated": ("logits", lambda p: p.write_bytes(p.read_bytes()[:-5]), True, "bytes, .* were written"),
    "chunk emptied": ("logits", lambda p: p.write_bytes(b""), True, "has 0 bytes"),
    "chunk garbled": ("logits", garble, False, "checksum"),
    "seeds garbled": ("seeds", garble, False, "checksum"),
}


@pytest.mark.parametrize("array, how, quick, reason", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_slab_is_detected_and_rewritten(tmp_path, array, how, quick, reason):
    store = create(tmp_path / "s")
    logits, seeds = write(store, 0, "weak")
    write(store, 1, "weak")
    how(chunk_file(store, array=array))
    assert store.is_complete(0, "weak") is not quick
    assert not store.is_complete(0, "weak", deep=True)
    assert [(r, v) for r, v, _ in store.damaged_slabs(deep=True)] == [(0, "weak")]
    assert store.is_complete(1, "weak", deep=True)
    read = store.seeds if array == "seeds" else store.slab
    with pytest.raises(KdcacheError, match=rf"slab \(round 0, view 'weak'\) of .* is damaged \(.*{reason}.*\); "
                                           "rerun precompute"):
        read(0, "weak")
    info = store.info(deep=True)
    assert info["complete_slabs"] == 1 and [d["view"] for d in info["damaged_slabs"]] == ["weak"]
    assert info["incomplete_slabs"] == 4
    # Precompute rewrites what its deep check finds damaged.
    store.write_slab(0, "weak", logits, seeds, {})
    assert torch.equal(LogitStore.open(tmp_path / "s").slab(0, "weak"), logits.half().float())
    assert store.damaged_slabs(deep=True) == []


def test_all_zero_chunks_are_written_and_read(tmp_path):
    store = create(tmp_path / "s")
    store.write_slab(0, "weak", torch.zeros(64, 10), torch.zeros(64, dtype=torch.int64), {})
    assert store.is_complete(0, "weak", deep=True)
    assert torch.equal(store.slab(0, "weak"), torch.zeros(64, 10))


def test_damaged_metadata_is_one_line_error(tmp_path):
    store = create(tmp_path / "s")
    write(store, 0, "weak")
    write(store, 0, "strong")
    (tmp_path / "s" / slab_path(0, "weak") / "zarr.json").write_text("{garbage")
    (tmp_path / "s" / slab_path(0, "strong") / "logits" / "zarr.json").write_text("{garbage")
    store = LogitStore.open(tmp_path / "s")
    assert store.damaged_slabs() == [(0, "weak", store.damaged_slabs()[0][2])]
    assert "zarr.json is unreadable" in store.damaged_slabs()[0][2]
    with pytest.raises(KdcacheError, match="view 'weak'.* is damaged"):
        store.slab(0, "weak")
    with pytest.raises(KdcacheError, match="view 'strong'.* is damaged.*JSONDecodeError"):
        store.slab(0, "strong")
    assert [key[:2] for key in store.damaged_slabs(deep=True)] == [(0, "weak"), (0, "strong")]
    (tmp_path / "s" / "zarr.json").write_text("{garbage")
    with pytest.raises(KdcacheError, match="zarr.json is unreadable.*delete it and rerun precompute"):
        LogitStore.open(tmp_path / "s")


@pytest.mark.parametrize("key, value, message", [
    ("kdcache_store_format", 1, "format 1, without the chunk checksums.*--overwrite"),
    ("kdcache_store_format", "2", "damaged root attribute 'kdcache_store_format'"),
    ("num_samples", "64", "damaged root attribute 'num_samples'"),
    ("identity", {"encoding": "bf8"}, "damaged root attributes \\(unknown encoding 'bf8'"),
    ("views", None, "damaged root attribute 'views'"),
    ("views", ["weak", {"x": 1}], "damaged root attributes \\(views must be"),
    ("rounds", 0, "damaged root attributes \\(a store needs"),
])
def test_old_or_damaged_root_attributes_are_refused(tmp_path, key, value, message):
    create(tmp_path / "s")
    zarr.open_group(tmp_path / "s", mode="r+").update_attributes({key: value})
    with pytest.raises(KdcacheError, match=message):
        LogitStore.open(tmp_path / "s")
    assert create(tmp_path / "s", overwrite=True).complete_slabs() == []


def test_full_disk_is_one_line_and_leaves_the_slab_incomplete(tmp_path, monkeypatch):
    store = create(tmp_path / "s")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(zarr.Group, "create_array", full_disk)
    with pytest.raises(KdcacheError, match="cannot write to .* \\(No space left on device\\); free space"):
        write(store, 0, "weak")
    monkeypatch.undo()
    assert (0, "weak") in store.missing_slabs()
    write(store, 0, "weak")
    assert store.is_complete(0, "weak", deep=True)


# ---- locks ---------------------------------------------------------------------------


def test_overwrite_is_refused_while_a_slab_is_locked(tmp_path):
    store = create(tmp_path / "s")
    lock = store.slab_lock(1, "strong")
    assert lock.path == tmp_path / "s" / "locks" / "r00001-strong.lock"
    assert lock.try_acquire()
    try:
        assert not FileLock(lock.path).try_acquire()  # flock: a second open file conflicts
        with pytest.raises(KdcacheError, match=rf"refusing to overwrite .*pid {os.getpid()}"):
            create(tmp_path / "s", overwrite=True)
    finally:
        lock.release()
    write(store, 0, "weak")  # the locks folder is no zarr node: reading and writing ignore it
    assert store.is_complete(0, "weak", deep=True)
    fresh = create(tmp_path / "s", overwrite=True)
    assert fresh.complete_slabs() == [] and not (tmp_path / "s" / "locks").exists()
    (tmp_path / "s" / "locks").write_text("not a folder")
    with pytest.raises(KdcacheError, match="cannot write to"):
        fresh.slab_lock(0, "weak")


# ---- concurrency ---------------------------------------------------------------------

N, C = 2000, 100
ALL_KEYS = [(r, v) for r in range(6) for v in VIEWS]


def _writer(path, keys, start, pause):
    store = LogitStore.open(path, mode="r+")
    start.wait(60)
    for round, view in keys:
        write(store, round, view)
        time.sleep(pause)


def _reader(path, ready, results):
    """Poll the store; check every slab it reports complete against the written data."""
    store = LogitStore.open(path)
    ready.set()
    counts, bad, checked = [], [], set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(checked) < len(ALL_KEYS):
        complete = store.complete_slabs()
        counts.append(len(complete))
        for key in complete:
            if key not in checked:
                logits, seeds = make_logits(*key, N, C)
                ok = torch.equal(store.slab(*key), logits.half().float())
                ok = ok and torch.equal(store.seeds(*key), seeds)
                if not ok:
                    bad.append(key)
                checked.add(key)
    results.put((counts, bad, len(checked)))


def _run(processes, release=None, timeout=90):
    """Start the processes, then `release` them together, and wait for clean exits."""
    for p in processes:
        p.start()
    if release is not None:
        release.set()
    for p in processes:
        p.join(timeout)
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.terminate()
    assert not alive, "a store process hung"
    assert [p.exitcode for p in processes] == [0] * len(processes)


def test_reader_only_sees_complete_correct_slabs(tmp_path):
    path = str(tmp_path / "s")
    create(path, num_samples=N, num_classes=C, rounds=6)
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_reader, args=(path, ready, results))
    writer = ctx.Process(target=_writer, args=(path, ALL_KEYS, ready, 0.05))
    _run([reader, writer])
    counts, bad, checked = results.get(timeout=5)
    assert bad == [] and checked == len(ALL_KEYS)
    assert counts == sorted(counts), "a slab went from complete to incomplete"
    assert any(0 < n < len(ALL_KEYS) for n in counts), "reader never overlapped the writer"


def test_concurrent_writers_lose_no_markers(tmp_path):
    path = str(tmp_path / "s")
    create(path, num_samples=N, num_classes=C, rounds=6)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    # Each writer takes one view of every round: both create the same round groups.
    writers = [ctx.Process(target=_writer, args=(path, ALL_KEYS[i::2], start, 0)) for i in (0, 1)]
    _run(writers, release=start)
    store = LogitStore.open(path)
    assert store.complete_slabs() == ALL_KEYS and store.missing_slabs() == []
    for key in ALL_KEYS:
        assert torch.equal(store.slab(*key), make_logits(*key, N, C)[0].half().float())
        assert store.slab_stats(*key) == {"teacher_acc": 0.5 + key[0] / 100}


# ---- prefetcher ----------------------------------------------------------------------


def test_prefetcher_yields_in_order(tmp_path):
    store = create(tmp_path / "s")
    keys = [(2, "weak"), (0, "strong"), (1, "weak"), (0, "weak")]
    expected = {key: write(store, *key)[0].half().float() for key in keys}
    got = list(SlabPrefetcher(store.slab, keys, depth=2))
    assert [key for key, _ in got] == keys
    assert all(torch.equal(slab, expected[key]) for key, slab in got)


def test_prefetcher_propagates_errors_and_stops(tmp_path):
    store = create(tmp_path / "s")
    write(store, 0, "weak")
    prefetcher = SlabPrefetcher(store.slab, [(0, "weak"), (0, "strong"), (0, "weak")])
    seen = []
    with pytest.raises(KdcacheError, match="not complete"):
        for key, _ in prefetcher:
            seen.append(key)
    assert seen == [(0, "weak")] and not prefetcher._thread.is_alive()

    early = SlabPrefetcher(store.slab, [(0, "weak")] * 5)
    for _ in early:
        break
    early.close()
    assert not early._thread.is_alive()
