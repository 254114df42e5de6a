"""Streamed prepare of image folders (imagefolder, tiny-imagenet): own-size JPEG with
--max-side, torchvision's order, conversions to RGB, the streamed fingerprint and
mean/std, and bad files, on small files made with Pillow in their real formats."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kdcache.data import DatasetMeta, load_split, prepare_dataset
from kdcache.data.beton import BetonFile
from kdcache.data.meta import channel_stats, fingerprint, histogram_stats
from kdcache.data.prepare import FileSamples
from kdcache.data.sources import IMAGENET_NORMALIZATION, TINY_IMAGENET_NORMALIZATION, FileSplit
from kdcache.data.transform import resize_crop
from kdcache.errors import KdcacheError

RNG = np.random.default_rng(0)


def smooth(h: int, w: int) -> np.ndarray:
    """A smooth RGB image (small JPEG error), different for each call."""
    y, x = np.mgrid[0:h, 0:w]
    a, b, c = RNG.uniform(0.02, 0.2, 3)
    return np.stack([(120 + 100 * np.sin(a * x + b * y + k * c)) for k in range(3)], -1).astype(np.uint8)


def save(path, image: np.ndarray, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, **kw)


def make_folder(root, sizes: dict[str, list[tuple[int, int]]], split="train"):
    """root/split/<class>/<i>.jpg with the given (h, w) per image; returns {path: pixels}."""
    images = {}
    for cls, shapes in sizes.items():
        for i, (h, w) in enumerate(shapes):
            image = smooth(h, w)
            save(root / split / cls / f"{i}.jpg", image, quality=95)
            images[root / split / cls / f"{i}.jpg"] = image
    return images


def stored_jpegs(out, split):
    return [np.asarray(Image.open(io.BytesIO(b))) for b in BetonFile(out / f"{split}.beton").stored_images()]


def expected_fingerprint(out) -> str:
    """The documented formula, recomputed here: stored bytes in index order, then labels, per split."""
    h = hashlib.sha256()
    for split in ("train", "test"):
        beton = BetonFile(out / f"{split}.beton")
        for stored in beton.stored_images():
            h.update(stored)
        h.update(beton.labels.astype("<i8").tobytes())
    return h.hexdigest()


def assert_no_leftovers(parent, name):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_imagefolder_keeps_each_size_capped_in_torchvision_order(tmp_path):
    from torchvision.datasets import ImageFolder

    src = tmp_path / "src"
    train = make_folder(src, {"dog": [(40, 90), (120, 30)], "cat": [(50, 50), (33, 71), (200, 100)]})
    train.update(make_folder(src / "train" / "cat", {"nested": [(20, 24)]}, split="."))  # cat/nested/0.jpg
    (src / "train" / "cat" / "notes.txt").write_text("not an image: skipped, like torchvision")
    make_folder(src, {"cat": [(64, 48)], "dog": [(30, 30), (45, 60)]}, split="val")
    meta = prepare_dataset("imagefolder", tmp_path / "out", root=src, max_side=100)

    assert meta.own_size and meta.image_shape == [3, None, None] and meta.image_encoding == "jpeg"
    assert meta.class_names == ["cat", "dog"] and meta.counts == {"train": 6, "test": 3}
    assert (meta.mean, meta.std) == IMAGENET_NORMALIZATION
    assert DatasetMeta.load(tmp_path / "out") == meta
    reference = ImageFolder(str(src / "train")).samples
    beton = BetonFile(tmp_path / "out" / "train.beton")
    assert beton.labels.tolist() == [label for _, label in reference]
    for (path, _), stored, h, w in zip(reference, stored_jpegs(tmp_path / "out", "train"), beton.heights, beton.widths):
        source = train[type(tmp_path)(path)]
        sh, sw = source.shape[:2]
        scale = min(1.0, 100 / max(sh, sw))  # only the larger images shrink, to a longer side of 100
        assert (h, w) == (round(sh * scale), round(sw * scale)) and stored.shape == (h, w, 3)
        if scale == 1:
            assert np.abs(stored.astype(int) - source).mean() < 3
    assert meta.fingerprint == expected_fingerprint(tmp_path / "out")


def test_cli_options_of_image_folders(tmp_path):
    from typer.testing import CliRunner

    from kdcache.cli.data import data_app

    make_folder(tmp_path / "src", {"a": [(30, 80), (64, 20)], "b": [(50, 50)]})
    make_folder(tmp_path / "src", {"a": [(40, 40)], "b": [(70, 10)]}, split="val")
    args = ["prepare", "imagefolder", "--root", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
            "--max-side", "48", "--normalization", "dataset"]
    result = CliRunner().invoke(data_app, args)
    assert result.exit_code == 0, result.output
    assert "image 3 x own size jpeg" in result.output
    meta = DatasetMeta.load(tmp_path / "o")
    beton = BetonFile(tmp_path / "o" / "train.beton")
    assert max(beton.heights.max(), beton.widths.max()) == 48 and meta.mean != list(IMAGENET_NORMALIZATION[0])
    result = CliRunner().invoke(data_app, [*args[:5], str(tmp_path / "r"), "--raw"])
    assert isinstance(result.exception, KdcacheError) and "raw storage needs one size" in str(result.exception)


def test_streamed_fingerprint_is_deterministic_and_sees_one_file(tmp_path):
    src = tmp_path / "src"
    images = make_folder(src, {"a": [(30, 40), (41, 22)], "b": [(25, 25)]})
    make_folder(src, {"a": [(20, 20)], "b": [(20, 30)]}, split="val")
    first = prepare_dataset("imagefolder", tmp_path / "o1", root=src)
    again = prepare_dataset("imagefolder", tmp_path / "o1", root=src, overwrite=True)
    assert again.fingerprint == first.fingerprint
    path = next(iter(images))
    changed = images[path].copy()
    changed[5:15, 5:15] = 255 - changed[5:15, 5:15]
    save(path, changed, quality=95)
    assert prepare_dataset("imagefolder", tmp_path / "o2", root=src).fingerprint != first.fingerprint


def test_one_size_jpeg_folder_records_its_shape(tmp_path):
    make_folder(tmp_path / "src", {"a": [(24, 32)] * 2, "b": [(24, 32)]})
    make_folder(tmp_path / "src", {"a": [(24, 32)], "b": [(24, 32)]}, split="test")
    meta = prepare_dataset("imagefolder", tmp_path / "out", root=tmp_path / "src")
    assert meta.image_shape == [3, 24, 32] and not meta.own_size and meta.image_encoding == "jpeg"


def test_size_streams_the_square_raw_data_as_before(tmp_path):
    """--size: shorter side + centre crop, raw, and the same fingerprint formula as array sources."""
    src = tmp_path / "src"
    train = make_folder(src, {"a": [(40, 60), (30, 30)], "b": [(64, 20)]})
    make_folder(src, {"a": [(50, 50)], "b": [(16, 16)]}, split="val")
    meta = prepare_dataset("imagefolder", tmp_path / "out", root=src, size=24, normalization="dataset")
    assert meta.image_shape == [3, 24, 24] and meta.image_encoding == "raw"
    images, labels = load_split(tmp_path / "out", "train")
    hwc = images.permute(0, 2, 3, 1).numpy()
    for got, path in zip(hwc, train):
        assert np.array_equal(got, resize_crop(Image.open(path), 24))
    test_images, test_labels = load_split(tmp_path / "out", "test")
    arrays = [(hwc, labels.numpy()), (test_images.permute(0, 2, 3, 1).numpy(), test_labels.numpy())]
    assert meta.fingerprint == fingerprint(arrays)
    assert np.allclose(meta.mean, channel_stats(hwc)[0], atol=1e-12) and np.allclose(meta.std, channel_stats(hwc)[1], atol=1e-12)


def test_histogram_stats_match_channel_stats():
    images = RNG.integers(0, 256, (7, 9, 11, 3), dtype=np.uint8)
    counts = np.stack([np.bincount(images[..., c].ravel(), minlength=256) for c in range(3)])
    for a, b in zip(histogram_stats(counts), channel_stats(images)):
        assert np.allclose(a, b, rtol=0, atol=1e-12)


def test_modes_are_converted_to_rgb_with_alpha_over_black(tmp_path):
    src = tmp_path / "src" / "train"
    rgb = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    alpha = np.zeros((8, 8), np.uint8)
    alpha[:, 4:] = 255
    alpha[0, 4] = 128
    (src / "a").mkdir(parents=True)
    Image.fromarray(rgb).convert("L").save(src / "a" / "gray.png")
    Image.fromarray(np.dstack([rgb, alpha])).save(src / "a" / "rgba.png")
    palette = Image.fromarray(rgb).quantize(8)
    palette.info["transparency"] = 0
    palette.save(src / "a" / "pal.png", transparency=0)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    (src / "b").mkdir()
    cmyk.save(src / "b" / "cmyk.jpg", quality=100)
    Image.fromarray(np.dstack([rgb[..., 0], alpha])).convert("LA").save(src / "b" / "la.png")
    make_folder(tmp_path / "src", {"a": [(8, 8)], "b": [(8, 8)]}, split="val")
    meta = prepare_dataset("imagefolder", tmp_path / "out", root=tmp_path / "src", jpeg=False)
    assert meta.image_shape == [3, 8, 8] and meta.image_encoding == "raw"
    images, _ = load_split(tmp_path / "out", "train")
    gray, pal, rgba, cmyk_rgb, la = images.permute(0, 2, 3, 1).numpy()  # sorted: a/gray, a/pal, a/rgba, b/cmyk, b/la
    assert np.array_equal(gray, np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, 2))
    assert np.array_equal(rgba[:, 4:][1:], rgb[:, 4:][1:]) and rgba[:, :4].max() == 0  # opaque kept, clear -> black
    assert np.abs(rgba[0, 4].astype(int) - rgb[0, 4].astype(int) * 128 / 255).max() <= 1
    index = np.asarray(Image.open(src / "a" / "pal.png"))
    assert pal[index == 0].max(initial=0) == 0 and np.array_equal(pal[index != 0], np.asarray(palette.convert("RGB"))[index != 0])
    assert np.array_equal(cmyk_rgb, np.asarray(Image.open(src / "b" / "cmyk.jpg").convert("RGB")))
    assert la[:, :4].max() == 0 and np.array_equal(la[1:, 4:, 0], rgb[1:, 4:, 0]) and np.array_equal(la[..., 0], la[..., 2])


# ---------------------------------------------------------------- Tiny-ImageNet

def make_tiny(root, wnids=("n02", "n01", "n03"), per_class=3, val_per_class=2):
    """The released layout: wnids.txt (unsorted), words.txt, train/<wnid>/images + boxes, val/images + annotations."""
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tname of {w}, alias\n" for w in (*wnids, "n99")))
    for w in wnids:
        for i in range(per_class):
            save(root / "train" / w / "images" / f"{w}_{i}.JPEG", smooth(64, 64))
        (root / "train" / w / f"{w}_boxes.txt").write_text("x\t0\t0\t10\t10\n")
    lines = []
    for k in range(val_per_class * len(wnids)):
        image = smooth(64, 64)
        save(root / "val" / "images" / f"val_{k}.JPEG", np.asarray(Image.fromarray(image).convert("L")) if k == 0 else image)
        lines.append(f"val_{k}.JPEG\t{wnids[(k * 2) % len(wnids)]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return lines


def test_tiny_imagenet_layout_order_and_names(tmp_path):
    lines = make_tiny(tmp_path / "tiny")
    meta = prepare_dataset("tiny-imagenet", tmp_path / "out", root=tmp_path / "tiny")
    assert meta.class_names == ["name of n01, alias", "name of n02, alias", "name of n03, alias"]  # wnids sorted
    assert meta.image_shape == [3, 64, 64] and meta.image_encoding == "raw" and meta.counts == {"train": 9, "test": 6}
    assert (meta.mean, meta.std) == TINY_IMAGENET_NORMALIZATION
    images, labels = load_split(tmp_path / "out", "train")
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    first = np.asarray(Image.open(tmp_path / "tiny" / "train" / "n01" / "images" / "n01_0.JPEG").convert("RGB"))
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), first)
    wnid_of = dict(line.split("\t")[:2] for line in lines)
    order = sorted(wnid_of, key=lambda f: (sorted(set(wnid_of.values())).index(wnid_of[f]), f))
    test_images, test_labels = load_split(tmp_path / "out", "test")
    assert test_labels.tolist() == [sorted(set(wnid_of.values())).index(wnid_of[f]) for f in order]
    gray = order.index("val_0.JPEG")
    assert np.array_equal(test_images[gray, 0], test_images[gray, 1])  # the grayscale JPEG became 3 equal channels
    jpeg = prepare_dataset("tiny-imagenet", tmp_path / "jpeg", root=tmp_path / "tiny", jpeg=True, max_train=4)
    assert jpeg.image_shape == [3, 64, 64] and jpeg.image_encoding == "jpeg" and jpeg.counts == {"train": 4, "test": 6}
    assert jpeg.preprocessing.endswith("first 4 train samples")
    decoded, _ = load_split(tmp_path / "jpeg", "test")  # one size: the existing loaders read it
    assert (decoded.int() - test_images.int()).abs().float().mean() < 3


# ---------------------------------------------------------------- bad input

def bad_folder(case: str, tmp):
    """Builds an image folder broken as `case` says; returns (source, root, options, expected message)."""
    src = tmp / "src"
    images = make_folder(src, {"cat": [(30, 40), (20, 20)], "dog": [(25, 35)]})
    make_folder(src, {"cat": [(20, 20)], "dog": [(22, 22)]}, split="val")
    first = next(iter(images))
    if case == "truncated jpeg":
        first.write_bytes(first.read_bytes()[:first.stat().st_size // 2])
        return "imagefolder", src, {}, f"{first} is not a readable image ("
    if case == "text named .jpg":
        (src / "train" / "dog" / "x.jpg").write_text("hello, I am text")
        return "imagefolder", src, {}, f"{src / 'train' / 'dog' / 'x.jpg'} is not a readable image (not an image format"
    if case == "bad file in the test split":
        (src / "val" / "dog" / "z.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
        return "imagefolder", src, {}, f"{src / 'val' / 'dog' / 'z.png'} is not a readable image"
    if case == "empty class folder":
        (src / "train" / "bird").mkdir()
        return "imagefolder", src, {}, f"{src / 'train' / 'bird'} holds no images"
    if case == "raw of several sizes":
        return "imagefolder", src, {"jpeg": False}, "raw storage needs one size: pass --jpeg, or --size N"
    if case == "max-side with size":
        return "imagefolder", src, {"size": 8, "max_side": 16}, "pass one of them"
    if case == "max-side on arrays":
        return "digits", None, {"max_side": 16}, "--max-side applies to image folders"
    if case == "unknown normalization":
        return "imagefolder", src, {"normalization": "cifar"}, "unknown --normalization"
    if case == "tiny: unknown wnid":
        make_tiny(tmp / "tiny")
        with open(tmp / "tiny" / "val" / "val_annotations.txt", "a") as f:
            f.write("val_0.JPEG\tn77\t0\t0\t1\t1\n")
        return "tiny-imagenet", tmp / "tiny", {}, "line 7: 'n77' is not in wnids.txt"
    if case == "tiny: missing val image":
        make_tiny(tmp / "tiny")
        (tmp / "tiny" / "val" / "images" / "val_3.JPEG").unlink()
        return "tiny-imagenet", tmp / "tiny", {}, "missing file .*val_3.JPEG"
    if case == "tiny: no wnids.txt":
        make_tiny(tmp / "tiny")
        (tmp / "tiny" / "wnids.txt").unlink()
        return "tiny-imagenet", tmp / "tiny", {}, "missing file .*wnids.txt"
    raise AssertionError(case)


BAD = ["truncated jpeg", "text named .jpg", "bad file in the test split", "empty class folder", "raw of several sizes",
       "max-side with size", "max-side on arrays", "unknown normalization", "tiny: unknown wnid",
       "tiny: missing val image", "tiny: no wnids.txt"]


@pytest.mark.parametrize("case", BAD)
def test_bad_folders_fail_in_one_line_and_leave_nothing(tmp_path, case):
    source, root, options, message = bad_folder(case, tmp_path)
    with pytest.raises(KdcacheError, match=message if "*" in message else None) as err:
        prepare_dataset(source, tmp_path / "out", root=root, **options)
    if "*" not in message:
        assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert_no_leftovers(tmp_path, "out")


def test_cli_reports_a_worker_failure_in_one_line(tmp_path):
    """The failure happens inside ffcv's writer workers; the user sees one line naming the file."""
    source, root, _, message = bad_folder("truncated jpeg", tmp_path)
    first = message.split(" is not")[0]
    bad_too = tmp_path / "src" / "train" / "dog" / "broken.jpg"
    bad_too.write_bytes(b"\xff\xd8\xff\xe0 not really")
    result = subprocess.run([sys.executable, "-m", "kdcache.cli", "data", "prepare", source, "--root", str(root),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and first in lines[0] and "(1 more files fail too)" in lines[0], result.stderr
    assert_no_leftovers(tmp_path, "out")


def test_an_image_too_large_for_a_page_is_refused(tmp_path):
    save(tmp_path / "big.png", RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    split = FileSplit(np.array([bytes(tmp_path / "big.png")]), np.zeros(1, np.int64))
    samples = FileSamples(split, size=None, max_side=None, one_size=None, page_size=1024, jpeg=True, histogram=False)
    with pytest.raises(KdcacheError, match="beton page; pass --max-side"):
        samples.load(0)
    image, label, index = samples[0]  # what a writer worker gets: a placeholder, the failure counted
    assert image.shape == (1, 1, 3) and (label, index) == (0, 0)
    with pytest.raises(KdcacheError, match="big.png is 40x40"):
        samples.raise_first_error()


def test_array_sources_keep_their_fingerprint_and_normalization(tmp_path):
    """Datasets prepared before streaming existed keep their identity: the digits fingerprint
    and mean as kdcache 0.1 wrote them. --normalization imagenet overrides the mean/std only."""
    meta = prepare_dataset("digits", tmp_path / "d", size=16)
    assert meta.fingerprint == "7a4440a02b9a40c67b2307600fbbf030dbbefa7115916ec2ddc6106ad49cc1bd"
    assert meta.mean == [0.0764638024455262] * 3 and meta.preprocessing == "gray->rgb, zero-pad centred 8x8->16x16"
    imagenet = prepare_dataset("digits", tmp_path / "i", size=16, normalization="imagenet")
    assert (imagenet.mean, imagenet.std) == IMAGENET_NORMALIZATION and imagenet.fingerprint == meta.fingerprint
