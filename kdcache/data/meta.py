"""DatasetMeta: the meta.json sidecar written next to the betons."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from kdcache.errors import KdcacheError

META_FILE = "meta.json"


@dataclass
class DatasetMeta:
    """What `kdcache data prepare` recorded about a dataset dir (its meta.json): classes,
    image shape, split sizes, the train split's mean/std that every view is normalised
    with, and the fingerprint that ties stores and runs to these exact pixels and labels.
    `DatasetMeta.load(dir)` reads and validates it."""

    name: str
    num_classes: int
    class_names: list[str]
    image_shape: list  # [3, H, W]; [3, None, None] when JPEG images keep their own sizes
    counts: dict[str, int]  # {"train": N, "test": M}
    mean: list[float]  # per channel, 0..1 scale, train split
    std: list[float]
    fingerprint: str  # see `fingerprint`
    source: str  # where the data was read from
    preprocessing: str  # what was done to the source pixels (kdcache.data.transform)
    image_encoding: str  # "raw" or "jpeg"
    kdcache_version: str
    # split -> BetonFile.content_check() of its beton; {} in datasets written by kdcache 0.1
    split_checks: dict[str, str] = field(default_factory=dict)

    @property
    def own_size(self) -> bool:
        """True when images keep their own sizes (JPEG betons of e.g. ImageNet): views are
        then cut at decode time, and `image_shape` is [3, None, None]."""
        return self.image_shape[1] is None

    def save(self, directory: Path) -> None:
        (Path(directory) / META_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "DatasetMeta":
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise KdcacheError(f"--data {directory} is a file; pass the folder `kdcache data prepare` wrote")
        path = directory / META_FILE
        try:
            data = json.loads(path.read_text())
            meta = cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data or f.name != "split_checks"})
        except FileNotFoundError:
            raise KdcacheError(f"missing {path}; prepare the dataset with `kdcache data prepare`") from None
        except OSError as err:
            raise KdcacheError(f"cannot read {path} ({err.strerror}); check its permissions") from None
        except (ValueError, KeyError, TypeError) as err:
            raise KdcacheError(f"{path} is corrupt ({type(err).__name__}: {err}); re-run `kdcache data prepare --overwrite`") from None
        meta._check(path)
        return meta

    def _check(self, path: Path) -> None:
        """Values a hand-edited or damaged meta.json may hold that would train on wrong inputs."""
        def bad(what: str):
            raise KdcacheError(f"{path}: {what}; re-run `kdcache data prepare --overwrite`")

        shape = self.image_shape
        if not (isinstance(shape, list) and len(shape) == 3 and shape[0] == 3 and
                (shape[1:] == [None, None] or all(isinstance(v, int) and v > 0 for v in shape[1:]))):
            bad(f"image_shape must be [3, H, W] or [3, null, null], got {shape!r}")
        if self.own_size and self.image_encoding != "jpeg":
            bad("images of their own sizes must be stored as JPEG")
        numbers = [*self.mean, *self.std]
        if len(self.mean) != 3 or len(self.std) != 3 or not all(isinstance(v, (int, float)) for v in numbers):
            bad(f"mean and std must be 3 numbers each, got {self.mean} and {self.std}")
        if not all(math.isfinite(v) for v in numbers) or min(self.std) <= 0:
            bad(f"std must be positive and mean/std finite, got mean {self.mean} std {self.std}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            bad(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        if not isinstance(self.counts, dict) or not all(isinstance(self.counts.get(s), int) and self.counts[s] > 0
                                                        for s in ("train", "test")):
            bad(f"counts must give positive train and test sizes, got {self.counts!r}")


def fingerprint(splits: list[tuple[np.ndarray, np.ndarray]]) -> str:
    """sha256 over, for each split in order (train, test): the images as stored
    (uint8 [N,H,W,3] C-order bytes, before any JPEG encoding), then the labels as int64 little-endian."""
    h = hashlib.sha256()
    for images, labels in splits:
        h.update(np.ascontiguousarray(images).data)
        h.update(labels.astype("<i8").tobytes())
    return h.hexdigest()


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of [N,H,W,3] uint8 images on the 0..1 scale (float64 sums)."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].reshape(-1, 3).astype(np.float64)
        total += x.sum(0)
        total_sq += (x * x).sum(0)
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return [float(m) / 255 for m in mean], [float(s) / 255 for s in std]


def histogram_stats(counts: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0..1 scale from [3, 256] value counts (what the
    streamed prepare sums), in exact integer arithmetic up to the final division."""
    values = np.arange(256, dtype=np.int64)
    mean, std = [], []
    for c in counts.astype(np.int64):
        n, s1, s2 = int(c.sum()), int(c @ values), int(c @ (values * values))
        mean.append(s1 / n / 255)
        std.append(math.sqrt(n * s2 - s1 * s1) / n / 255)
    return mean, std
