"""kdcache.data: every source format on small files in their real layout, the real
Fashion-MNIST, both loader backends, ordering/sharding, and bad input."""

from __future__ import annotations

import gzip
import pickle
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from kdcache.cli.data import data_app
from kdcache.data import DatasetMeta, epoch_order, load_split, make_loader, prepare_dataset
from kdcache.data.loaders import MemoryLoader
from kdcache.data.sources import FASHION_MNIST_ROOT
from kdcache.errors import KdcacheError

RNG = np.random.default_rng(0)


def images_hwc(data_dir, split):
    """load_split's images back in HWC, to compare with source arrays."""
    images, labels = load_split(data_dir, split)
    return images.permute(0, 2, 3, 1).numpy(), labels.numpy()


def assert_no_leftovers(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ---------------------------------------------------------------- writers of the real formats

def write_cifar10(root: Path, per_batch=4, n_test=3):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        batch = {b"batch_label": name.encode(), b"labels": RNG.integers(0, 10, n).tolist(),
                 b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
        (d / name).write_bytes(pickle.dumps(batch))
        batches[name] = batch
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_cases_per_batch": per_batch}))
    return batches


def write_cifar100(root: Path):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    out = {}
    for name, n in (("train", 6), ("test", 4)):
        batch = {b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": RNG.integers(0, 100, n).tolist(),
                 b"coarse_labels": RNG.integers(0, 20, n).tolist(), b"filenames": [b"x.png"] * n}
        (d / name).write_bytes(pickle.dumps(batch))
        out[name] = batch
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": [b"s"] * 20}
    (d / "meta").write_bytes(pickle.dumps(meta))
    return out


def idx_bytes(array: np.ndarray) -> bytes:
    magic = {1: 0x801, 3: 0x803}[array.ndim]
    return magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape) + array.tobytes()


def write_idx(root: Path, gz: bool, n_train=7, n_test=5, side=6):
    root.mkdir(parents=True, exist_ok=True)
    arrays = {"train": (RNG.integers(0, 256, (n_train, side, side), dtype=np.uint8), RNG.integers(0, 10, n_train, dtype=np.uint8)),
              "t10k": (RNG.integers(0, 256, (n_test, side, side), dtype=np.uint8), RNG.integers(0, 10, n_test, dtype=np.uint8))}
    for prefix, (x, y) in arrays.items():
        for kind, a in (("images-idx3", x), ("labels-idx1", y)):
            path = root / f"{prefix}-{kind}-ubyte"
            data = idx_bytes(a)
            if gz:
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
            else:
                path.write_bytes(data)
    return arrays


def write_npz(path: Path, n_train=20, n_test=8, shape=(8, 8, 3), **extra):
    arrays = dict(x_train=RNG.integers(0, 256, (n_train, *shape), dtype=np.uint8), y_train=RNG.integers(0, 4, n_train),
                  x_test=RNG.integers(0, 256, (n_test, *shape), dtype=np.uint8), y_test=RNG.integers(0, 4, n_test))
    arrays.update(extra)
    np.savez(path, **arrays)
    return arrays


# ---------------------------------------------------------------- sources

def test_cifar10_pickles(tmp_path):
    batches = write_cifar10(tmp_path / "src")
    meta = prepare_dataset("cifar10", tmp_path / "out", root=tmp_path / "src")
    assert meta.counts == {"train": 20, "test": 3} and meta.image_shape == [3, 32, 32]
    assert meta.class_names[0] == "airplane" and meta.num_classes == 10
    images, labels = load_split(tmp_path / "out", "train")
    expected = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(images.numpy(), expected)
    assert labels.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert DatasetMeta.load(tmp_path / "out") == meta


def test_cifar100_pickles_root_is_the_folder_itself(tmp_path):
    batches = write_cifar100(tmp_path)
    meta = prepare_dataset("cifar100", tmp_path / "out", root=tmp_path / "cifar-100-python")
    assert meta.num_classes == 100 and meta.class_names[7] == "c7" and meta.counts == {"train": 6, "test": 4}
    images, labels = load_split(tmp_path / "out", "test")
    assert np.array_equal(images.numpy(), batches["test"][b"data"].reshape(-1, 3, 32, 32))
    assert labels.tolist() == batches["test"][b"fine_labels"]


def test_cifar_missing_files_and_failed_download(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    (tmp_path / "src").mkdir()
    with pytest.raises(KdcacheError, match="cifar-10-batches-py"):
        prepare_dataset("cifar10", tmp_path / "out", root=tmp_path / "src")
    assert_no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_gz_and_raw_with_pad(tmp_path, gz):
    arrays = write_idx(tmp_path / "src", gz)
    meta = prepare_dataset("mnist", tmp_path / "out", root=tmp_path / "src", size=9)
    assert meta.image_shape == [3, 9, 9] and meta.counts == {"train": 7, "test": 5}
    assert meta.preprocessing == "gray->rgb, zero-pad centred 6x6->9x9"
    images, labels = images_hwc(tmp_path / "out", "test")
    x, y = arrays["t10k"]
    assert np.array_equal(images[:, 1:7, 1:7], np.repeat(x[..., None], 3, axis=3))  # top/left pad (9-6)//2 = 1
    assert images[:, 0].max() == 0 and images[:, 7:].max() == 0 and images[:, :, 7:].max() == 0
    assert np.array_equal(labels, y)


def test_imagefolder_png_and_jpeg(tmp_path):
    pngs = {}
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / "src" / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                im = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(im).save(d / f"{i}.png")
                pngs[(split, cls, i)] = im
            Image.fromarray(RNG.integers(0, 256, (40, 24, 3), dtype=np.uint8)).save(d / "big.JPG")
    (tmp_path / "src" / "train" / "cat" / "notes.txt").write_text("ignored")
    meta = prepare_dataset("imagefolder", tmp_path / "out", root=tmp_path / "src", size=16)
    assert meta.class_names == ["cat", "dog"] and meta.counts == {"train": 8, "test": 8}
    images, labels = images_hwc(tmp_path / "out", "train")
    assert labels.tolist() == [0] * 4 + [1] * 4
    assert np.array_equal(images[0], pngs[("train", "cat", 0)])  # sorted: 0.png, 1.png, 2.png, big.JPG
    assert np.array_equal(images[6], pngs[("train", "dog", 2)])


def test_jpeg_encoding_decodes_with_ffcv_like_the_ffcv_backend(tmp_path):
    x = np.zeros((12, 48, 48, 3), dtype=np.uint8)
    x[:, 8:40, 8:40] = RNG.integers(60, 200, (12, 1, 1, 3), dtype=np.uint8)  # smooth: small JPEG error
    write_npz(tmp_path / "a.npz", x_train=x, x_test=x[:4], y_train=np.arange(12) % 4, y_test=np.arange(4))
    meta = prepare_dataset("npz", tmp_path / "out", root=tmp_path / "a.npz", jpeg=True)
    assert meta.image_encoding == "jpeg"
    images, labels = load_split(tmp_path / "out", "train")
    assert np.abs(images.permute(0, 2, 3, 1).numpy().astype(int) - x).mean() < 3
    batches = list(make_loader(tmp_path / "out", "train", 5, shuffle=False, backend="ffcv"))
    assert torch.equal(torch.cat([b[0] for b in batches]), images)


def test_digits_split_is_deterministic(tmp_path):
    meta = prepare_dataset("digits", tmp_path / "out")
    assert meta.counts == {"train": 1438, "test": 359} and meta.image_shape == [3, 8, 8]
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = images_hwc(tmp_path / "out", "test")
    assert np.array_equal(labels, d.target[4::5])
    assert np.array_equal(images[..., 0], np.round(d.images[4::5] * 255 / 16).astype(np.uint8))
    assert images.max() == 255


def test_max_train_and_max_test_keep_the_first_samples(tmp_path):
    full = prepare_dataset("digits", tmp_path / "full")
    part = prepare_dataset("digits", tmp_path / "part", max_train=100, max_test=7)
    assert part.counts == {"train": 100, "test": 7} and "first 100 train samples" in part.preprocessing
    assert part.fingerprint != full.fingerprint
    for split, n in (("train", 100), ("test", 7)):
        a, la = images_hwc(tmp_path / "full", split)
        b, lb = images_hwc(tmp_path / "part", split)
        assert np.array_equal(a[:n], b) and np.array_equal(la[:n], lb)
    with pytest.raises(KdcacheError, match="--max-train"):
        prepare_dataset("digits", tmp_path / "bad", max_train=0)


def test_npz_grayscale_and_class_names(tmp_path):
    arrays = write_npz(tmp_path / "a.npz", shape=(5, 7), class_names=np.array(["a", "b", "c", "d"]))
    meta = prepare_dataset("npz", tmp_path / "out", root=tmp_path / "a.npz")
    assert meta.class_names == ["a", "b", "c", "d"] and meta.image_shape == [3, 5, 7]
    images, labels = images_hwc(tmp_path / "out", "train")
    assert np.array_equal(images, np.repeat(arrays["x_train"][..., None], 3, axis=3))
    assert np.array_equal(labels, arrays["y_train"])
    x = arrays["x_train"].astype(np.float64) / 255
    assert np.allclose(meta.mean, [x.mean()] * 3) and np.allclose(meta.std, [x.std()] * 3)


def test_fingerprint_changes_with_one_pixel(tmp_path):
    arrays = write_npz(tmp_path / "a.npz")
    first = prepare_dataset("npz", tmp_path / "o1", root=tmp_path / "a.npz").fingerprint
    arrays["x_test"][3, 2, 1, 0] ^= 1
    np.savez(tmp_path / "b.npz", **arrays)
    second = prepare_dataset("npz", tmp_path / "o2", root=tmp_path / "b.npz").fingerprint
    assert first != second and len(first) == 64
    assert prepare_dataset("npz", tmp_path / "o1", root=tmp_path / "a.npz", overwrite=True).fingerprint == first


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_full_prepare_reads_back_exactly(tmp_path):
    meta = prepare_dataset("fashion-mnist", tmp_path / "fm", size=32)
    assert meta.counts == {"train": 60000, "test": 10000} and meta.image_shape == [3, 32, 32]
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = np.frombuffer(gzip.open(f"{FASHION_MNIST_ROOT}/{prefix}-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
        y = np.frombuffer(gzip.open(f"{FASHION_MNIST_ROOT}/{prefix}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
        images, labels = load_split(tmp_path / "fm", split)
        assert np.array_equal(labels.numpy(), y)
        assert np.array_equal(images[:, :, 2:30, 2:30].numpy(), np.broadcast_to(x.reshape(-1, 1, 28, 28), (len(y), 3, 28, 28)))
        assert images[:, :, :2].max() == 0 and images[:, :, 30:].max() == 0 and images[..., :2].max() == 0
    # The numpy beton reader agrees with ffcv's own reader, sample for sample.
    batches = list(make_loader(tmp_path / "fm", "test", 1000, shuffle=False, backend="ffcv"))
    assert torch.equal(torch.cat([b[0] for b in batches]), images)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)


# ---------------------------------------------------------------- loaders

@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    write_npz(d / "a.npz", n_train=103, n_test=10, shape=(6, 6, 3))
    prepare_dataset("npz", d / "out", root=d / "a.npz")
    return d / "out"


@pytest.mark.parametrize("drop_last,world_size", [(False, 1), (True, 2)])
def test_backends_yield_identical_batches(small_dir, drop_last, world_size):
    loaders = {b: make_loader(small_dir, "train", 16, shuffle=True, seed=5, backend=b, drop_last=drop_last,
                              rank=world_size - 1, world_size=world_size) for b in ("memory", "ffcv")}
    images, labels = load_split(small_dir, "train")
    for epoch in (0, 1):
        got = {}
        for name, loader in loaders.items():
            loader.set_epoch(epoch)
            got[name] = list(loader)
            assert len(got[name]) == len(loader)
        order = epoch_order(103, shuffle=True, seed=5, epoch=epoch, rank=world_size - 1, world_size=world_size)
        assert torch.equal(torch.cat([b[2] for b in got["memory"]]), torch.from_numpy(order[:len(got["memory"]) * 16] if drop_last else order))
        for (xm, ym, im), (xf, yf, i_f) in zip(got["memory"], got["ffcv"], strict=True):
            assert xm.dtype == torch.uint8 and xm.is_contiguous() and ym.dtype == torch.int64 and im.dtype == torch.int64
            assert torch.equal(xm, xf) and torch.equal(ym, yf) and torch.equal(im, i_f)
            assert torch.equal(xm, images[im]) and torch.equal(ym, labels[im])
        if drop_last:
            assert all(len(b[0]) == 16 for b in got["ffcv"])


def test_shuffle_is_a_seeded_permutation_that_changes_by_epoch():
    e0, e1 = (epoch_order(1000, shuffle=True, seed=1, epoch=e) for e in (0, 1))
    assert sorted(e0.tolist()) == list(range(1000)) and sorted(e1.tolist()) == list(range(1000))
    assert not np.array_equal(e0, e1)
    assert np.array_equal(e0, epoch_order(1000, shuffle=True, seed=1, epoch=0))
    assert not np.array_equal(e0, epoch_order(1000, shuffle=True, seed=2, epoch=0))
    assert np.array_equal(epoch_order(10, shuffle=False, seed=1, epoch=3), np.arange(10))


def test_shards_are_disjoint_cover_and_equal_length():
    shards = [epoch_order(10, shuffle=True, seed=0, epoch=2, rank=r, world_size=4) for r in range(4)]
    assert {len(s) for s in shards} == {3}
    flat = np.concatenate(shards)
    assert set(flat.tolist()) == set(range(10))
    full = epoch_order(10, shuffle=True, seed=0, epoch=2)
    assert sorted(flat.tolist()) == sorted(full.tolist() + full[:2].tolist())  # padded with the head, like DistributedSampler
    even = [set(epoch_order(12, shuffle=True, seed=0, epoch=0, rank=r, world_size=3).tolist()) for r in range(3)]
    assert sum(len(s) for s in even) == 12 and set().union(*even) == set(range(12))


# ---------------------------------------------------------------- bad input

def truncate(path: Path, keep: int):
    path.write_bytes(path.read_bytes()[:keep])


def bad_input(case: str, tmp: Path) -> tuple[str, Path | None, str]:
    """Builds the broken source for `case`; returns (source, root, expected message)."""
    src = tmp / "s"
    if case == "unknown source":
        return "imagenet21k", None, "unknown dataset source"
    if case == "missing root":
        return "mnist", None, "needs --root"
    if case == "missing idx file":
        write_idx(src, gz=True)
        (src / "t10k-labels-idx1-ubyte.gz").unlink()
        return "mnist", src, "missing file"
    if case == "truncated idx":
        write_idx(src, gz=False)
        truncate(src / "train-images-idx3-ubyte", 100)
        return "mnist", src, "truncated"
    if case == "truncated gz":
        write_idx(src, gz=True)
        truncate(src / "train-images-idx3-ubyte.gz", 30)
        return "mnist", src, "corrupt or truncated"
    if case == "bad idx magic":
        write_idx(src, gz=False)
        (src / "train-labels-idx1-ubyte").write_bytes(b"\0" * 20)
        return "mnist", src, "bad magic"
    if case == "truncated pickle":
        write_cifar10(src)
        truncate(src / "cifar-10-batches-py" / "data_batch_3", 500)
        return "cifar10", src, "corrupt or truncated"
    if case == "wrong cifar layout":
        (src / "cifar-100-python").mkdir(parents=True)
        (src / "cifar-100-python" / "meta").write_bytes(pickle.dumps({b"x": 1}))
        (src / "cifar-100-python" / "train").write_bytes(pickle.dumps({b"data": 1}))
        return "cifar100", src, "not a CIFAR batch"
    if case == "empty split":
        write_npz(tmp / "e.npz", n_test=0)
        return "npz", tmp / "e.npz", "test split is empty"
    if case == "npz missing keys":
        np.savez(tmp / "k.npz", x_train=np.zeros((2, 4, 4), np.uint8))
        return "npz", tmp / "k.npz", "lacks the arrays"
    if case == "float images":
        write_npz(tmp / "f.npz", x_train=np.zeros((3, 4, 4)), y_train=np.zeros(3, int))
        return "npz", tmp / "f.npz", "must be uint8"
    if case == "label out of range":
        write_npz(tmp / "l.npz", class_names=np.array(["a", "b"]))
        return "npz", tmp / "l.npz", "labels must lie in 0..1"
    if case == "imagefolder without val":
        (src / "train" / "a").mkdir(parents=True)
        return "imagefolder", src, "val"
    raise AssertionError(case)


BAD_INPUTS = ["unknown source", "missing root", "missing idx file", "truncated idx", "truncated gz", "bad idx magic",
              "truncated pickle", "wrong cifar layout", "empty split", "npz missing keys", "float images",
              "label out of range", "imagefolder without val"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_and_leaves_nothing(tmp_path, case):
    source, root, message = bad_input(case, tmp_path)
    with pytest.raises(KdcacheError, match=message):
        prepare_dataset(source, tmp_path / "out", root=root, size=8)
    assert_no_leftovers(tmp_path, "out")


def test_unwritable_out_and_existing_out(tmp_path):
    write_npz(tmp_path / "a.npz")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(KdcacheError, match="writable --out"):
        prepare_dataset("npz", tmp_path / "file" / "out", root=tmp_path / "a.npz")
    (tmp_path / "out").mkdir()
    with pytest.raises(KdcacheError, match="--overwrite"):
        prepare_dataset("npz", tmp_path / "out", root=tmp_path / "a.npz")
    assert list((tmp_path / "out").iterdir()) == []


def test_truncated_beton_and_bad_loader_arguments(small_dir, tmp_path):
    import shutil

    shutil.copytree(small_dir, tmp_path / "d")
    for keep in (3000, (tmp_path / "d" / "test.beton").stat().st_size - 400):
        truncate(tmp_path / "d" / "test.beton", keep)
        with pytest.raises(KdcacheError, match="truncated or corrupt"):
            load_split(tmp_path / "d", "test")
    with pytest.raises(KdcacheError, match="unknown loader backend"):
        make_loader(small_dir, "train", 4, shuffle=True, backend="dali")
    with pytest.raises(KdcacheError, match="rank"):
        make_loader(small_dir, "train", 4, shuffle=True, rank=2, world_size=2)
    with pytest.raises(KdcacheError, match="missing"):
        load_split(tmp_path, "train")


def test_raw_betons_prepare_and_load_without_ffcv(small_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # the GPU machine has no ffcv
    meta = prepare_dataset("digits", tmp_path / "digits", size=16)
    assert meta.image_encoding == "raw" and load_split(tmp_path / "digits", "test")[0].shape == (359, 3, 16, 16)
    images, labels = load_split(small_dir, "train")
    loader = make_loader(small_dir, "train", 8, shuffle=True)
    assert isinstance(loader, MemoryLoader) and images.shape == (103, 3, 6, 6) and len(labels) == 103
    with pytest.raises(KdcacheError, match="needs the ffcv package"):
        make_loader(small_dir, "train", 8, shuffle=True, backend="ffcv")


# ---------------------------------------------------------------- CLI

def test_cli_prepare_and_info(tmp_path):
    write_npz(tmp_path / "a.npz")
    runner = CliRunner()
    result = runner.invoke(data_app, ["prepare", "npz", "--root", str(tmp_path / "a.npz"), "--out", str(tmp_path / "o"), "--size", "10"])
    assert result.exit_code == 0, result.output
    meta = DatasetMeta.load(tmp_path / "o")
    assert f"fingerprint {meta.fingerprint[:12]}" in result.output and "train 20, test 8" in result.output
    info = runner.invoke(data_app, ["info", str(tmp_path / "o")])
    assert info.exit_code == 0 and '"image_shape": [\n    3,\n    10,\n    10\n  ]' in info.output


def test_jpeg_beton_of_own_sized_images_keeps_each_size(tmp_path):
    """The contract of own-size data: the beton records each image's size, meta.json says
    [3, None, None], and both refuse what would mix the two kinds of data."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from kdcache.data.beton import BetonFile

    rng = np.random.default_rng(0)
    sizes = [(20, 31), (40, 17), (33, 33)]
    samples = [(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), i % 2, i) for i, (h, w) in enumerate(sizes)]
    path = tmp_path / "train.beton"
    DatasetWriter(str(path), {"image": RGBImageField(write_mode="jpg"), "label": IntField(), "index": IntField()},
                  num_workers=1).from_indexed_dataset(samples)
    beton = BetonFile(path)
    assert beton.own_size and beton.height is None and not beton.is_raw
    assert beton.heights.tolist() == [20, 40, 33] and beton.widths.tolist() == [31, 17, 33]
    assert len(beton.content_check()) == 64

    meta = DatasetMeta(name="x", num_classes=2, class_names=["a", "b"], image_shape=[3, None, None],
                       counts={"train": 3, "test": 3}, mean=[0.5] * 3, std=[0.2] * 3, fingerprint="f",
                       source="s", preprocessing="none", image_encoding="jpeg", kdcache_version="0")
    meta.save(tmp_path)
    assert DatasetMeta.load(tmp_path).own_size
    meta.image_encoding = "raw"
    meta.save(tmp_path)
    with pytest.raises(KdcacheError, match="own sizes must be stored as JPEG"):
        DatasetMeta.load(tmp_path)
    meta.image_shape = [3, None, 5]
    meta.save(tmp_path)
    with pytest.raises(KdcacheError, match="image_shape must be"):
        DatasetMeta.load(tmp_path)


def test_ffcv_leaves_torchs_thread_count_alone(tmp_path):
    """ffcv sets torch's thread count process-wide (1 on import, num_workers per pass): a
    demo that prepared its data first then trained with 1 thread, slower and to other bits
    than a run that reused the data. Preparing and loading must keep the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        prepare_dataset("digits", tmp_path / "d", max_train=200, max_test=50)
        assert torch.get_num_threads() == 3
        for i, _ in enumerate(make_loader(tmp_path / "d", "train", 64, shuffle=True, backend="ffcv")):
            assert torch.get_num_threads() == 3
        assert i == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(16, 16), (40, 24)])
def test_raw_beton_is_ffcvs_single_worker_file_byte_for_byte(tmp_path, shape):
    """kdcache writes raw betons itself (no ffcv needed); the file is the one ffcv's writer
    makes, over several pages and a page of 2 MiB with a part-filled last page."""
    from kdcache.data.beton import ArraySamples, BetonFile, torch_threads_kept, write_raw_beton

    rng = np.random.default_rng(3)
    per_page = (1 << 21) // (3 * shape[0] * shape[1])
    n = 2 * per_page + 17
    images = rng.integers(0, 256, (n, *shape, 3), dtype=np.uint8)
    samples = ArraySamples(images, rng.integers(0, 100, n))
    write_raw_beton(tmp_path / "ours.beton", samples)
    with torch_threads_kept():
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter

        DatasetWriter(str(tmp_path / "ffcv.beton"), {"image": RGBImageField(write_mode="raw"), "label": IntField(),
                                                     "index": IntField()},
                      page_size=1 << 21, num_workers=1).from_indexed_dataset(samples, chunksize=1000)
    assert (tmp_path / "ours.beton").read_bytes() == (tmp_path / "ffcv.beton").read_bytes()
    back = BetonFile(tmp_path / "ours.beton").read_raw_images()
    assert np.array_equal(back, images.transpose(0, 3, 1, 2))


def test_raw_beton_refuses_mixed_sizes_and_oversized_images(tmp_path):
    from kdcache.data.beton import ArraySamples, write_raw_beton

    mixed = [(np.zeros((8, 8, 3), np.uint8), 0, 0), (np.zeros((8, 9, 3), np.uint8), 0, 1)]
    with pytest.raises(KdcacheError, match="sample 1 is uint8 \\(8, 9, 3\\)"):
        write_raw_beton(tmp_path / "a.beton", mixed)
    with pytest.raises(KdcacheError, match="does not fit a page"):
        write_raw_beton(tmp_path / "b.beton", ArraySamples(np.zeros((1, 1024, 1024, 3), np.uint8), np.zeros(1)))
