"""Memory that does not grow with the dataset: precompute streams a slab chunk by chunk,
distill holds only the encoded rows a rank visits and decodes each batch on its device,
with the same logits (bitwise) as decoding the whole slab."""

import numpy as np
import pytest
import torch

import kdcache.storage.store
from kdcache.data import epoch_order
from kdcache.distill import DistillConfig, build_job
from kdcache.engine import fit
from kdcache.errors import KdcacheError
from kdcache.models import read_checkpoint
from kdcache.precompute import PrecomputeConfig, precompute
from kdcache.recipes import make_recipe
from kdcache.storage import LogitStore, get_encoding, measure_encoding
from kdcache.teachers import CachedTeacher

ENCODINGS = ["float16", "int8", "topk:3"]


def reference_decode(name, arrays, num_classes):
    """The numpy decoding of docs/store-format.md (what kdcache decoded with before torch)."""
    if name == "float16":
        return arrays["logits"].astype(np.float32)
    if name == "int8":
        return arrays["offset"][:, None] + arrays["scale"][:, None] * arrays["logits"].astype(np.float32)
    out = np.repeat(arrays["tail"][:, None], num_classes, axis=1)
    np.put_along_axis(out, arrays["indices"].astype(np.int64), arrays["logits"].astype(np.float32), axis=1)
    return out


@pytest.mark.parametrize("name, num_classes", [*((e, 10) for e in ENCODINGS), ("topk:20", 1000),
                                               ("topk:2", 2**16 + 5)])
def test_torch_decoding_equals_the_numpy_reference_bitwise(name, num_classes):
    logits = (torch.randn(37, num_classes, generator=torch.Generator().manual_seed(1)) * 6).numpy()
    enc = get_encoding(name)
    arrays = enc.encode(logits)
    assert np.array_equal(enc.decode(arrays, num_classes).numpy(), reference_decode(name, arrays, num_classes))


def fabricated(path, encoding, n=300, classes=10, rounds=2, views=("weak", "strong")):
    store = LogitStore.create(path, identity={"teacher": "fabricated"}, num_samples=n, num_classes=classes,
                              rounds=rounds, views=list(views), encoding=encoding)
    for r in range(rounds):
        for v, view in enumerate(views):
            g = torch.Generator().manual_seed(10 * r + v)
            store.write_slab(r, view, torch.randn(n, classes, generator=g) * 5, torch.arange(n) * 7 + r)
    return store


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_ranks_shard_decodes_per_batch_to_the_slabs_rows(tmp_path, encoding):
    store = fabricated(tmp_path / "s", encoding)
    n, batch = store.num_samples, 32
    whole = CachedTeacher(store, ["weak", "strong"], epochs=3)
    whole.begin_epoch(0)
    full_bytes = whole.nbytes
    whole.close()
    for world_size in (1, 3):
        teacher = CachedTeacher(store, ["weak", "strong"], epochs=3)
        orders = {e: epoch_order(n, shuffle=True, seed=5, epoch=e, rank=world_size - 1, world_size=world_size)
                  for e in range(3)}
        teacher.visit(orders.__getitem__)
        for epoch in (0, 1, 2, 0):
            round_ = teacher.begin_epoch(epoch)
            assert round_ == epoch % store.rounds
            held = len(np.unique(orders[epoch]))
            assert teacher.nbytes == full_bytes * held // n + 2 * 4 * n  # its rows, a lookup table per slot
            for indices in torch.from_numpy(orders[epoch]).split(batch):
                for slot in ("weak", "strong"):
                    got = teacher.logits(round_, slot, None, indices)
                    assert got.dtype == torch.float32
                    assert torch.equal(got, store.slab(round_, slot)[indices])
        if world_size > 1:  # a sample of another rank's shard is not held
            other = np.setdiff1d(np.arange(n), orders[0])[:1]
            with pytest.raises((IndexError, RuntimeError)):
                teacher.logits(0, "weak", None, torch.from_numpy(other))
        teacher.close()


def test_slab_rows_reads_only_the_rows_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(kdcache.storage.store, "CHUNK_BYTES", 1000)  # many chunks of a few rows
    store = fabricated(tmp_path / "s", "topk:3", rounds=1, views=("weak",))
    assert store.chunk_rows() < 100
    rows = np.array([0, 1, 57, 58, 59, 200, 299])
    assert torch.equal(store.slab(0, "weak", rows=rows), store.slab(0, "weak")[rows])
    assert torch.equal(store.seeds(0, "weak", rows=rows), store.seeds(0, "weak")[rows])
    encoded = store.slab_rows(0, "weak", rows)
    assert encoded.arrays["logits"].shape == (len(rows), 3)
    assert torch.equal(encoded.logits(torch.tensor([299, 0, 58])), store.slab(0, "weak")[[299, 0, 58]])
    for bad in ([3, 1], [1, 1], [-1], [300]):
        with pytest.raises(KdcacheError, match="sorted, distinct sample indices in 0..299"):
            store.slab(0, "weak", rows=np.array(bad))


def test_an_unfinished_streamed_slab_is_not_complete_and_is_rewritten(tmp_path):
    store = LogitStore.create(tmp_path / "t", identity={"teacher": "fabricated"}, num_samples=300, num_classes=10,
                              rounds=1, views=["weak"])
    logits = torch.randn(300, 10)
    writer = store.slab_writer(0, "weak")
    writer.append(logits[:100], torch.arange(100))
    with pytest.raises(ValueError, match="100 of 300 rows written"):
        writer.finish({})
    assert not store.is_complete(0, "weak") and store.missing_slabs() == [(0, "weak")]
    with pytest.raises(KdcacheError, match="not complete"):
        store.slab(0, "weak")
    with pytest.raises(ValueError, match="got logits \\(201, 10\\)"):
        writer.append(torch.randn(201, 10), torch.arange(201))
    writer = store.slab_writer(0, "weak", measure=True)  # a rerun starts the slab again
    for part in logits.split(128):
        writer.append(part, torch.arange(len(part)))
    writer.finish({"a": 1})
    assert store.slab_stats(0, "weak") == {"a": 1}
    assert torch.equal(store.slab(0, "weak"), logits.half().float())
    errors = measure_encoding(logits, "float16")
    assert writer.errors.result()["max_abs_error"] == errors["max_abs_error"]
    for key in ("mean_kl_t1", "mean_kl_t4"):
        assert writer.errors.result()[key] == pytest.approx(errors[key], rel=1e-9)


def test_precompute_streams_chunks_and_stores_what_a_whole_slab_would(digits_dir, teacher_ckpt, tmp_path,
                                                                       monkeypatch):
    """Chunks of 150 rows and batches of 64: batches straddle chunk boundaries."""
    import kdcache.precompute as pre

    monkeypatch.setattr(kdcache.storage.store, "CHUNK_BYTES", 150 * (2 * 10 + 8))
    sizes = []
    run = pre.run_teacher_on_slab

    def recording(*args):
        *head, write, chunk_rows = args

        def write_recorded(logits, seeds):
            sizes.append(len(logits))
            write(logits, seeds)
        return run(*head, write_recorded, chunk_rows)

    monkeypatch.setattr(pre, "run_teacher_on_slab", recording)
    cfg = PrecomputeConfig(teacher="resnet8", ckpt=teacher_ckpt, data_dir=digits_dir, views={"weak": "weak"},
                           rounds=1, out=tmp_path / "s", batch_size=64, device="cpu")
    store = precompute(cfg, progress=False)
    n = store.num_samples
    chunk = store.chunk_rows()
    assert chunk < 200 and sizes == [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])

    # The same teacher over the same batches, whole: the stored slab and its stats agree.
    from kdcache.data import make_loader
    from kdcache.models import load_teacher
    from kdcache.replay import replayer_for

    teacher = load_teacher("resnet8", teacher_ckpt, 10).eval()
    replayer = replayer_for(store)
    with torch.no_grad():
        whole = torch.cat([teacher(replayer(0, "weak", images, indices))
                           for images, _, indices in make_loader(digits_dir, "train", 64, shuffle=False)])
    assert torch.equal(store.slab(0, "weak"), whole.half().float())
    stats, errors = store.slab_stats(0, "weak"), measure_encoding(whole, "float16")
    assert stats["max_abs_error"] == errors["max_abs_error"]
    assert stats["mean_kl_t1"] == pytest.approx(errors["mean_kl_t1"], rel=1e-9)
    assert stats["mean_kl_t4"] == pytest.approx(errors["mean_kl_t4"], rel=1e-9)


class WholeSlabTeacher:
    """What the cached teacher served before: rows of the whole decoded float32 slab."""

    def __init__(self, store):
        self.store = store

    def begin_epoch(self, epoch):
        return epoch % self.store.rounds

    def visit(self, rows_of):
        pass

    def logits(self, round_, slot, views, indices):
        return self.store.slab(round_, slot)[indices]

    def close(self):
        pass


@pytest.mark.parametrize("encoding, loss", [("float16", "crld"), ("topk:3", "kd")])
def test_distill_from_encoded_shards_ends_with_the_whole_slab_weights(digits_dir, teacher_ckpt, crld_store, tmp_path,
                                                                       encoding, loss):
    store = crld_store
    if encoding != store.encoding:  # the same logits, stored top-k
        store = LogitStore.create(tmp_path / "store", identity={**crld_store.identity, "encoding": encoding},
                                  num_samples=crld_store.num_samples, num_classes=crld_store.num_classes,
                                  rounds=crld_store.rounds, views=crld_store.views, encoding=encoding)
        for r, v in crld_store.complete_slabs():
            store.write_slab(r, v, crld_store.slab(r, v), crld_store.seeds(r, v))
    weights = {}
    for name in ("shards", "whole"):
        job = build_job(DistillConfig(student="resnet8", loss=loss, data_dir=digits_dir, out=tmp_path / name,
                                      recipe=make_recipe("resnet8", epochs=3, batch_size=128), store=store.path,
                                      device="cpu", show_progress=False))
        if name == "whole":
            job.teacher.close()
            job.teacher = WholeSlabTeacher(store)
        fit(job)
        weights[name] = read_checkpoint(tmp_path / name / "last.pth")["model"]
    assert all(torch.equal(weights["shards"][k], weights["whole"][k]) for k in weights["whole"])
