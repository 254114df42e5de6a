"""Small datasets of JPEG images of their own sizes (what `kdcache data prepare` writes for
ImageNet-like sources), for the decode-time view tests and benchmarks/bench_decode.py."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

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


def write_jpeg_split(path: Path, image: Callable[[int], np.ndarray], labels: np.ndarray, num_workers: int = 1) -> None:
    """A beton of the images image(0..N-1) (made in the writer's workers: nothing big is pickled)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Samples:
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return image(i), int(labels[i]), int(i)

    fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=90), "label": IntField(), "index": IntField()}
    DatasetWriter(str(path), fields, page_size=PAGE_SIZE, num_workers=num_workers).from_indexed_dataset(
        Samples(), chunksize=100)


def synthetic_jpeg_dataset(out: Path, sizes: list[tuple[int, int]], num_classes: int = 4, test: int = 16,
                           seed: int = 0, num_workers: int = 1) -> Path:
    """`out/{train,test}.beton` of smooth images, train of the given (H, W) sizes, `test` more of
    random sizes, labels at random, and a meta.json marking the images as of their own sizes."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {"train": sizes, "test": [tuple(rng.integers(40, 120, 2)) for _ in range(test)]}
    checks, h = {}, hashlib.sha256()
    for name, split_sizes in splits.items():
        def image(i, name=name, split_sizes=split_sizes):
            return smooth_image(np.random.default_rng([seed, len(name), i]), *map(int, split_sizes[i]))

        write_jpeg_split(out / f"{name}.beton", image, rng.integers(0, num_classes, len(split_sizes)), num_workers)
        checks[name] = BetonFile(out / f"{name}.beton").content_check()
        h.update(checks[name].encode())
    DatasetMeta(name="own-size-jpeg", num_classes=num_classes, class_names=[str(c) for c in range(num_classes)],
                image_shape=[3, None, None], counts={k: len(v) for k, v in splits.items()},
                mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], fingerprint=h.hexdigest(), source="synthetic",
                preprocessing="none", image_encoding="jpeg", kdcache_version=kdcache.__version__,
                split_checks=checks).save(out)
    return out
