"""Small datasets of JPEG images of their own sizes (what `kdcache data prepare` writes for
ImageNet-like sources), for the decode-time view tests and benchmarks/bench_decode.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

import kdcache
from kdcache.data.beton import PAGE_SIZE, BetonFile
from kdcache.data.meta import DatasetMeta


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] of smooth colour blobs and an edge or two: JPEG sizes like photos', not noise's."""
    from PIL import Image

    coarse = rng.integers(0, 256, (rng.integers(3, 9), rng.integers(3, 9), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).copy()
    top, left = rng.integers(0, height), rng.integers(0, width)
    image[top:top + height // 4, left:left + width // 5] = rng.integers(0, 256, 3, dtype=np.uint8)
    return image


def write_jpeg_split(path: Path, images: list[np.ndarray], labels: np.ndarray, num_workers: int = 1) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Samples:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], int(labels[i]), int(i)

    fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=90), "label": IntField(), "index": IntField()}
    DatasetWriter(str(path), fields, page_size=PAGE_SIZE, num_workers=num_workers).from_indexed_dataset(
        Samples(), chunksize=100)


def write_jpeg_dataset(out: Path, splits: dict[str, tuple[list[np.ndarray], np.ndarray]], num_classes: int,
                       num_workers: int = 1) -> Path:
    """`out/{train,test}.beton` and a meta.json marking the images as of their own sizes."""
    out.mkdir(parents=True, exist_ok=True)
    checks, h = {}, hashlib.sha256()
    for name, (images, labels) in splits.items():
        write_jpeg_split(out / f"{name}.beton", images, labels, num_workers)
        checks[name] = BetonFile(out / f"{name}.beton").content_check()
        h.update(checks[name].encode())
    train = np.concatenate([im.reshape(-1, 3) for im in splits["train"][0]]).astype(np.float64) / 255
    DatasetMeta(name="own-size-jpeg", num_classes=num_classes, class_names=[str(c) for c in range(num_classes)],
                image_shape=[3, None, None], counts={k: len(v[1]) for k, v in splits.items()},
                mean=[float(v) for v in train.mean(0)], std=[float(v) for v in train.std(0)],
                fingerprint=h.hexdigest(), source="synthetic", preprocessing="none", image_encoding="jpeg",
                kdcache_version=kdcache.__version__, split_checks=checks).save(out)
    return out


def synthetic_jpeg_dataset(out: Path, sizes: list[tuple[int, int]], num_classes: int = 4, test: int = 16,
                           seed: int = 0, num_workers: int = 1) -> Path:
    """Train images of the given (H, W) sizes, `test` more of random sizes, labels at random."""
    rng = np.random.default_rng(seed)
    test_sizes = [tuple(rng.integers(40, 120, 2)) for _ in range(test)]
    splits = {name: ([smooth_image(rng, int(h), int(w)) for h, w in s], rng.integers(0, num_classes, len(s)))
              for name, s in (("train", sizes), ("test", test_sizes))}
    return write_jpeg_dataset(out, splits, num_classes, num_workers)
