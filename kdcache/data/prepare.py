"""prepare_dataset: source files -> DIR/{train,test}.beton + DIR/meta.json, all or nothing."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import kdcache
from kdcache.data.beton import BetonFile, write_beton
from kdcache.data.meta import DatasetMeta, channel_stats, fingerprint
from kdcache.data.sources import read_source
from kdcache.data.transform import fit_to_size
from kdcache.errors import KdcacheError
from kdcache.locks import FileLock
from kdcache.outputs import check_dataset_out, is_dataset_dir

SPLITS = ("train", "test")
WRITER_WORKERS = min(2, os.cpu_count() or 1)  # the writer is I/O + memcpy bound for raw images
WORK_LOCK = ".lock"


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
    check_dataset_out(out, overwrite=overwrite, source=Path(root) if root is not None else None)
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

    remove_abandoned_work(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise KdcacheError(f"cannot create {tmp} ({err.strerror}); choose a writable --out") from None
    lock = FileLock(tmp / WORK_LOCK)  # tells a later run that this folder is not abandoned
    try:
        lock.try_acquire()
        for name in SPLITS:
            write_beton(tmp / f"{name}.beton", *splits[name], jpeg=jpeg, num_workers=WRITER_WORKERS)
            meta.split_checks[name] = BetonFile(tmp / f"{name}.beton").content_check()
        meta.save(tmp)
        (tmp / WORK_LOCK).unlink()
        _replace_dir(tmp, out, overwrite)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KdcacheError(f"cannot write {out} ({err.strerror or err}); check free space and permissions") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.release()
    return meta


def remove_abandoned_work(out: Path) -> None:
    """Delete what a killed `prepare` into `out` left beside it: temporary folders whose
    writer is gone (their lock is free) and replaced datasets it had not deleted yet."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*") if out.parent.is_dir() else []:
        lock = FileLock(tmp / WORK_LOCK)
        if (tmp / WORK_LOCK).is_file() and lock.try_acquire():
            shutil.rmtree(tmp, ignore_errors=True)
            lock.release()
    for old in out.parent.glob(f".{out.name}.old-*") if out.parent.is_dir() else []:
        if is_dataset_dir(old):
            shutil.rmtree(old, ignore_errors=True)


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Renames tmp to out; an existing dataset at out (--overwrite, checked to be one) is
    moved aside first, then deleted. Another process that wrote out meanwhile wins."""
    old = None
    if out.exists():
        if not (overwrite and is_dataset_dir(out)):
            raise KdcacheError(f"{out} was created by another process while this one ran; "
                               "pass --overwrite to replace it or choose another --out")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)
