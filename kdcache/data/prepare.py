"""prepare_dataset: source files -> DIR/{train,test}.beton + DIR/meta.json, all or nothing."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import kdcache
from kdcache.data.beton import write_beton
from kdcache.data.meta import DatasetMeta, channel_stats, fingerprint
from kdcache.data.sources import read_source
from kdcache.data.transform import fit_to_size
from kdcache.errors import KdcacheError

SPLITS = ("train", "test")
WRITER_WORKERS = min(2, os.cpu_count() or 1)  # the writer is I/O + memcpy bound for raw images


def prepare_dataset(source: str, out: str | Path, *, root: str | Path | None = None, size: int | None = None,
                    jpeg: bool = False, overwrite: bool = False, max_train: int | None = None,
                    max_test: int | None = None) -> DatasetMeta:
    """Reads `source` (see `kdcache.data.sources`), brings images to 3 channels and `size`
    (see `kdcache.data.transform`), and writes the betons and meta.json into `out`.
    `max_train` / `max_test` keep only the first N samples of a split (quick experiments).

    Everything is written into a temporary sibling directory that is renamed to `out` only
    once complete, so a failure never leaves a half-written dataset behind.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise KdcacheError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    if size is not None and not 1 <= size <= 4096:
        raise KdcacheError(f"--size must be between 1 and 4096, got {size}")
    limits = {"train": max_train, "test": max_test}
    for name, limit in limits.items():
        if limit is not None and limit < 1:
            raise KdcacheError(f"--max-{name} must be at least 1, got {limit}")
    raw = read_source(source, Path(root) if root is not None else None, size)

    splits, steps = {}, set()
    for name in SPLITS:
        part = getattr(raw, name)
        keep = slice(0, limits[name])
        images, step = fit_to_size(part.images[keep], size)
        splits[name] = (images, part.labels[keep])
        steps.add(step)
        if limits[name] is not None and limits[name] < len(part.labels):
            steps.add(f"first {limits[name]} {name} samples")
    train_shape, test_shape = splits["train"][0].shape[1:], splits["test"][0].shape[1:]
    if train_shape != test_shape:
        raise KdcacheError(f"{source}: train images are {train_shape[:2]} but test images {test_shape[:2]}; pass --size N")
    mean, std = raw.normalization or channel_stats(splits["train"][0])
    h, w = train_shape[:2]
    meta = DatasetMeta(
        name=source, num_classes=len(raw.class_names), class_names=raw.class_names, image_shape=[3, h, w],
        counts={n: len(splits[n][1]) for n in SPLITS}, mean=mean, std=std,
        fingerprint=fingerprint([splits[n] for n in SPLITS]), source=raw.root,
        preprocessing=", ".join(s for s in [raw.preprocessing, *sorted(steps)] if s and s != "none") or "none",
        image_encoding="jpeg" if jpeg else "raw", kdcache_version=kdcache.__version__,
    )

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise KdcacheError(f"cannot create {tmp} ({err.strerror}); choose a writable --out") from None
    try:
        for name in SPLITS:
            write_beton(tmp / f"{name}.beton", *splits[name], jpeg=jpeg, num_workers=WRITER_WORKERS)
        meta.save(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _replace_dir(tmp: Path, out: Path) -> None:
    """Renames tmp to out; an existing out (--overwrite) is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None and old.is_dir():
        shutil.rmtree(old)
    elif old is not None:
        old.unlink()
