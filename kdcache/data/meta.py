"""DatasetMeta: the meta.json sidecar written next to the betons."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from kdcache.errors import KdcacheError

META_FILE = "meta.json"


@dataclass
class DatasetMeta:
    name: str
    num_classes: int
    class_names: list[str]
    image_shape: list[int]  # [3, H, W]
    counts: dict[str, int]  # {"train": N, "test": M}
    mean: list[float]  # per channel, 0..1 scale, train split
    std: list[float]
    fingerprint: str  # see `fingerprint`
    source: str  # where the data was read from
    preprocessing: str  # what was done to the source pixels (kdcache.data.transform)
    image_encoding: str  # "raw" or "jpeg"
    kdcache_version: str

    def save(self, directory: Path) -> None:
        (Path(directory) / META_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "DatasetMeta":
        path = Path(directory) / META_FILE
        try:
            data = json.loads(path.read_text())
            return cls(**{f.name: data[f.name] for f in fields(cls)})
        except FileNotFoundError:
            raise KdcacheError(f"missing {path}; prepare the dataset with `kdcache data prepare`") from None
        except (ValueError, KeyError, TypeError) as err:
            raise KdcacheError(f"{path} is corrupt ({type(err).__name__}: {err}); re-run `kdcache data prepare --overwrite`") from None


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
