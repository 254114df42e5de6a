"""prepare_dataset: source files -> DIR/{train,test}.beton + DIR/meta.json, all or nothing.

Two paths share the all-or-nothing writing (`_write_atomically`):
- array sources (CIFAR, idx, digits, npz) are read whole, brought to one size and written;
  the fingerprint hashes the pixels (before any JPEG encoding) and the labels;
- folder sources (imagefolder, tiny-imagenet) are streamed: ffcv's writer workers decode
  one file at a time (`FileSamples`), so memory does not grow with the pixels, and the
  fingerprint hashes what was stored (raw pixels, or the JPEG bytes) read back in index
  order, then the labels. For raw storage both give the same hash for the same pixels.
"""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

import kdcache
from kdcache.data.beton import JPEG_QUALITY, PAGE_SIZE, ArraySamples, BetonFile, write_beton
from kdcache.data.meta import DatasetMeta, channel_stats, fingerprint, histogram_stats
from kdcache.data.sources import IMAGENET_NORMALIZATION, FileDataset, FileSplit, RawDataset, read_source
from kdcache.data.transform import fit_to_size, load_image
from kdcache.errors import KdcacheError
from kdcache.locks import FileLock
from kdcache.outputs import check_dataset_out, is_dataset_dir

SPLITS = ("train", "test")
WRITER_WORKERS = min(2, os.cpu_count() or 1)  # the writer is I/O + memcpy bound for raw images
FILE_WORKERS = len(os.sched_getaffinity(0))  # decoding image files is CPU bound
FILE_CHUNK = 64  # files per work item: small, so that a small dataset still uses every worker
OWN_SIZE_PAGE = 8 << 20  # ffcv's default page, for uncapped own-size JPEGs (a larger JPEG needs --max-side)
MAX_PAGE = 64 << 20  # every writer worker holds one page in memory
MAX_SIDE_LIMIT = 16384
NORMALIZATIONS = ("dataset", "imagenet")
WORK_LOCK = ".lock"


def prepare_dataset(source: str, out: str | Path, *, root: str | Path | None = None, size: int | None = None,
                    jpeg: bool | None = None, max_side: int | None = None, normalization: str | None = None,
                    overwrite: bool = False, max_train: int | None = None, max_test: int | None = None) -> DatasetMeta:
    """Reads `source` (see `kdcache.data.sources`), brings images to 3 channels and `size`
    (see `kdcache.data.transform`), and writes the betons and meta.json into `out`.

    `jpeg`: store JPEG (quality 90) instead of raw pixels; None takes the source's default
    (JPEG for image folders kept at their own size, raw otherwise). `max_side` caps the
    longer side of image-folder images kept at their own size. `normalization`: the mean/std
    meta.json records, "dataset" (the train split's) or "imagenet" (torchvision's); None
    takes the source's default (the published values of its model zoo, else "dataset").
    `max_train` / `max_test` keep only the first N samples of a split (quick experiments).

    Everything is written into a temporary sibling directory that is renamed to `out` only
    once complete, so a failure never leaves a half-written dataset behind.
    """
    out = Path(out).absolute()
    check_dataset_out(out, overwrite=overwrite, source=Path(root) if root is not None else None)
    if size is not None and not 1 <= size <= 4096:
        raise KdcacheError(f"--size must be between 1 and 4096, got {size}")
    if max_side is not None and not 1 <= max_side <= MAX_SIDE_LIMIT:
        raise KdcacheError(f"--max-side must be between 1 and {MAX_SIDE_LIMIT}, got {max_side}")
    if max_side is not None and size is not None:
        raise KdcacheError("--max-side caps images kept at their own size; --size makes them square: pass one of them")
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise KdcacheError(f"unknown --normalization {normalization!r}; choose one of: {', '.join(NORMALIZATIONS)}")
    limits = {"train": max_train, "test": max_test}
    for name, limit in limits.items():
        if limit is not None and limit < 1:
            raise KdcacheError(f"--max-{name} must be at least 1, got {limit}")
    raw = read_source(source, Path(root) if root is not None else None, size)
    if isinstance(raw, FileDataset):
        def write(tmp: Path) -> DatasetMeta:
            return _write_files(tmp, source, raw, size=size, jpeg=jpeg, max_side=max_side,
                                normalization=normalization, limits=limits)
    else:
        if max_side is not None:
            raise KdcacheError(f"--max-side applies to image folders (imagefolder, tiny-imagenet), not {source}; "
                               "use --size")
        write = _array_writer(source, raw, size=size, jpeg=bool(jpeg), normalization=normalization, limits=limits)
    remove_abandoned_work(out)
    return _write_atomically(out, overwrite, write)


def _mean_std(default, choice: str | None, compute: Callable[[], tuple]) -> tuple[list[float], list[float]]:
    """The (mean, std) meta.json records: see `prepare_dataset`'s `normalization`."""
    if choice == "imagenet":
        default = IMAGENET_NORMALIZATION
    mean, std = compute() if choice == "dataset" or default is None else default
    return list(mean), list(std)


def _array_writer(source: str, raw: RawDataset, *, size: int | None, jpeg: bool, normalization: str | None,
                  limits: dict) -> Callable[[Path], DatasetMeta]:
    """Brings the arrays to one size and describes them; returns the function writing them."""
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
    mean, std = _mean_std(raw.normalization, normalization, lambda: channel_stats(splits["train"][0]))
    h, w = train_shape[:2]
    meta = DatasetMeta(
        name=source, num_classes=len(raw.class_names), class_names=raw.class_names, image_shape=[3, h, w],
        counts={n: len(splits[n][1]) for n in SPLITS}, mean=mean, std=std,
        fingerprint=fingerprint([splits[n] for n in SPLITS]), source=raw.root,
        preprocessing=", ".join(s for s in [raw.preprocessing, *sorted(steps)] if s and s != "none") or "none",
        image_encoding="jpeg" if jpeg else "raw", kdcache_version=kdcache.__version__,
    )

    def write(tmp: Path) -> DatasetMeta:
        for name in SPLITS:
            write_beton(tmp / f"{name}.beton", ArraySamples(*splits[name]), jpeg=jpeg, num_workers=WRITER_WORKERS)
            meta.split_checks[name] = BetonFile(tmp / f"{name}.beton").content_check()
        return meta
    return write


def _write_files(tmp: Path, source: str, data: FileDataset, *, size: int | None, jpeg: bool | None,
                 max_side: int | None, normalization: str | None, limits: dict) -> DatasetMeta:
    """Streams both splits' files into betons; returns their meta (see the module docstring)."""
    splits = {n: FileSplit(getattr(data, n).paths[:limits[n]], getattr(data, n).labels[:limits[n]]) for n in SPLITS}
    if jpeg is None:
        jpeg = data.sizes_vary and size is None
    one_size = None
    if not jpeg and size is None:  # raw storage keeps one size: the first training image's
        one_size = load_image(os.fsdecode(splits["train"].paths[0]), None, max_side).shape[:2]
    # A page must hold the largest stored image: bounded by its raw size when the side is known.
    side = size or max_side
    largest = 3 * side * side if side else 3 * one_size[0] * one_size[1] if one_size else None
    page = OWN_SIZE_PAGE if largest is None else min(MAX_PAGE, max(PAGE_SIZE, 1 << (largest - 1).bit_length()))
    need_stats = normalization == "dataset" or (normalization is None and data.normalization is None)

    digest, checks, shapes, counts = hashlib.sha256(), {}, set(), None
    for name in SPLITS:
        samples = FileSamples(splits[name], size=size, max_side=max_side, one_size=one_size, page_size=page,
                              jpeg=jpeg, histogram=need_stats and name == "train")
        path = tmp / f"{name}.beton"
        try:
            write_beton(path, samples, jpeg=jpeg, num_workers=FILE_WORKERS, page_size=page, chunksize=FILE_CHUNK)
        finally:  # a file that failed says more than what the writer then made of its placeholder
            samples.raise_first_error()
        beton = BetonFile(path)
        for stored in beton.stored_images(progress=f"fingerprint {name}"):
            digest.update(stored)
        digest.update(splits[name].labels.astype("<i8").tobytes())
        checks[name] = beton.content_check()
        shapes.add(None if beton.own_size else (beton.height, beton.width))
        if name == "train":
            counts = samples.value_counts()
    mean, std = _mean_std(data.normalization, normalization, lambda: histogram_stats(counts))
    h, w = shapes.pop() if len(shapes) == 1 and None not in shapes else (None, None)

    steps = ["decode RGB (gray and CMYK converted, alpha composited over black)"]
    if size is not None:
        steps.append(f"resize shorter side + centre-crop to {size}x{size}")
    elif max_side is not None:
        steps.append(f"longer side capped at {max_side} (INTER_AREA)")
    steps += [f"first {limits[n]} {n} samples" for n in SPLITS
              if limits[n] is not None and limits[n] < len(getattr(data, n).labels)]
    return DatasetMeta(
        name=source, num_classes=len(data.class_names), class_names=data.class_names, image_shape=[3, h, w],
        counts={n: len(splits[n].labels) for n in SPLITS}, mean=mean, std=std,
        fingerprint=digest.hexdigest(), source=data.root, preprocessing=", ".join(steps),
        image_encoding="jpeg" if jpeg else "raw", kdcache_version=kdcache.__version__, split_checks=checks,
    )


class FileSamples:
    """The writer's view of one split's files: item i decodes file i (`load_image`) in the
    ffcv worker that asks for it. Nothing may raise there (ffcv's writer waits forever for
    a dead worker), so a failing file is counted, the lowest failing index kept, and a 1x1
    black image stored in its place; `raise_first_error` then loads that file again in this
    process for its one-line error. With `histogram`, the count of each value per channel
    is summed: exact integers, whatever worker took whatever image."""

    PLACEHOLDER = np.zeros((1, 1, 3), dtype=np.uint8)

    def __init__(self, split: FileSplit, *, size: int | None, max_side: int | None,
                 one_size: tuple[int, int] | None, page_size: int, jpeg: bool, histogram: bool):
        self.paths, self.labels = split.paths, split.labels
        self.size, self.max_side, self.one_size = size, max_side, one_size
        self.page_size, self.jpeg, self.histogram = page_size, jpeg, histogram
        # [failures, lowest failing index, 3 x 256 value counts], shared with the forked workers
        self.shared = multiprocessing.Array(ctypes.c_int64, 2 + 3 * 256)
        self.shared[1] = len(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.fsdecode(self.paths[i])

    def load(self, i: int) -> np.ndarray:
        """File i's stored pixels, or a KdcacheError naming the file."""
        path = self.path(i)
        image = load_image(path, self.size, self.max_side)
        h, w = image.shape[:2]
        if self.one_size is not None and (h, w) != tuple(self.one_size):
            raise KdcacheError(f"{path} is {w}x{h}, not {self.one_size[1]}x{self.one_size[0]} like the first training "
                               "image; raw storage needs one size: pass --jpeg, or --size N")
        if image.nbytes > self.page_size:
            from ffcv.fields.rgb_image import encode_jpeg

            stored = len(encode_jpeg(image, JPEG_QUALITY)) if self.jpeg else image.nbytes
            if stored > self.page_size:
                raise KdcacheError(f"{path} is {w}x{h}, {stored / 2**20:.1f} MiB stored, more than a "
                                   f"{self.page_size >> 20} MiB beton page; pass --max-side N (e.g. 1024)")
        return image

    def __getitem__(self, i: int):
        i = int(i)
        try:
            image = self.load(i)
        except Exception:  # anything: see the class docstring
            with self.shared.get_lock():
                self.shared[0] += 1
                self.shared[1] = min(self.shared[1], i)
            return self.PLACEHOLDER, int(self.labels[i]), i
        if self.histogram:
            counts = np.concatenate([np.bincount(image[..., c].ravel(), minlength=256) for c in range(3)])
            with self.shared.get_lock():
                np.frombuffer(self.shared.get_obj(), dtype=np.int64)[2:] += counts
        return image, int(self.labels[i]), i

    def value_counts(self) -> np.ndarray:
        """[3, 256] int64: how many pixels of each channel hold each value (with `histogram`)."""
        return np.frombuffer(self.shared.get_obj(), dtype=np.int64)[2:].reshape(3, 256).copy()

    def raise_first_error(self) -> None:
        failures, first = self.shared[0], self.shared[1]
        if not failures:
            return
        more = f" ({failures - 1} more files fail too)" if failures > 1 else ""
        try:
            self.load(first)
        except KdcacheError as err:
            raise KdcacheError(f"{err}{more}") from None
        except Exception as err:  # what no check above foresaw: still one line naming the file
            raise KdcacheError(f"{self.path(first)} cannot be prepared ({type(err).__name__}: {err}); "
                               f"remove or replace it{more}") from None
        raise KdcacheError(f"{self.path(first)} failed in a writer worker but reads now; re-run the command")


def _write_atomically(out: Path, overwrite: bool, write: Callable[[Path], DatasetMeta]) -> DatasetMeta:
    """Runs `write(tmp)` (betons into tmp, returns their meta) in a temporary sibling of
    `out`, saves meta.json, and renames tmp to `out`; on any failure removes tmp."""
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise KdcacheError(f"cannot create {tmp} ({err.strerror}); choose a writable --out") from None
    lock = FileLock(tmp / WORK_LOCK)  # tells a later run that this folder is not abandoned
    try:
        lock.try_acquire()
        meta = write(tmp)
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
