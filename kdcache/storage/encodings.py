"""How a slab's float32 logits become the arrays stored on disk, and back.

Each encoding turns logits float32 [N, C] into named numpy arrays (always a `logits`
array, plus per-encoding side arrays) and decodes them back to float32. The name of
the encoding is part of a store's identity, so it is canonical (`topk` -> `topk:10`).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from kdcache.errors import KdcacheError, warn_once

_FLOAT16_MAX = float(np.finfo(np.float16).max)
SAMPLE = "sample"  # the row dimension every array of a slab shares


class Encoding:
    """Base class: `encode`, `decode` and the exact uncompressed size of one row."""

    name: str
    # What `encode` returns and `decode` needs, each with its zarr dimension names
    # (so xarray can open a slab).
    dimension_names: dict[str, tuple[str, ...]]

    @property
    def array_names(self) -> tuple[str, ...]:
        return tuple(self.dimension_names)

    def check(self, num_classes: int) -> None:
        """Raise KdcacheError if this encoding cannot store `num_classes` classes."""

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, arrays: Mapping[str, np.ndarray], num_classes: int) -> np.ndarray:
        raise NotImplementedError

    def bytes_per_row(self, num_classes: int) -> int:
        raise NotImplementedError


def _to_float16(logits: np.ndarray) -> np.ndarray:
    """Round to float16, refusing logits beyond its range instead of storing inf."""
    peak = float(np.abs(logits).max(initial=0.0))
    if peak > _FLOAT16_MAX:
        raise KdcacheError(f"logit magnitude {peak:.3g} exceeds the float16 range; use --encoding int8")
    return logits.astype(np.float16)


class Float16Encoding(Encoding):
    """Dense float16: error at most half a float16 ulp (relative 2**-11)."""

    name = "float16"
    dimension_names = {"logits": (SAMPLE, "class")}

    def encode(self, logits):
        return {"logits": _to_float16(logits)}

    def decode(self, arrays, num_classes):
        return arrays["logits"].astype(np.float32)

    def bytes_per_row(self, num_classes):
        return 2 * num_classes


class Int8Encoding(Encoding):
    """Per-row affine 8-bit codes: x ~ offset + scale * code, code in 0..255.

    offset is the row minimum and scale = (row max - row min) / 255, so the error is at
    most scale / 2 (plus float32 rounding) whatever the row's range.
    """

    name = "int8"
    dimension_names = {"logits": (SAMPLE, "class"), "scale": (SAMPLE,), "offset": (SAMPLE,)}

    def encode(self, logits):
        low = logits.min(axis=1)
        scale = ((logits.max(axis=1) - low) / 255.0).astype(np.float32)
        step = np.where(scale > 0, scale, 1.0)[:, None]
        codes = np.rint((logits - low[:, None]) / step).clip(0, 255).astype(np.uint8)
        return {"logits": codes, "scale": scale, "offset": low.astype(np.float32)}

    def decode(self, arrays, num_classes):
        codes = arrays["logits"].astype(np.float32)
        return arrays["offset"][:, None] + arrays["scale"][:, None] * codes

    def bytes_per_row(self, num_classes):
        return num_classes + 4 + 4


class TopKEncoding(Encoding):
    """The k largest logits in float16, largest first, with their class indices; the rest
    of the row is one constant `tail` = logsumexp(other logits) - log(C - k) (float32).

    That constant keeps the total softmax mass of the other classes at T=1, so the
    decoded softmax at T=1 equals the original on the top-k classes (up to float16
    rounding); at other temperatures the tail mass is approximate. The tail is clamped to
    the smallest kept value, so the top-k order survives the rounding.
    """

    dimension_names = {"logits": (SAMPLE, "rank"), "indices": (SAMPLE, "rank"), "tail": (SAMPLE,)}

    def __init__(self, k: int):
        if k < 1:
            raise KdcacheError(f"topk needs k >= 1, got {k}; use e.g. --encoding topk:10")
        self.k = k
        self.name = f"topk:{k}"

    def check(self, num_classes):
        if self.k >= num_classes:
            raise KdcacheError(
                f"encoding {self.name} needs k < the number of classes ({num_classes}); pick a smaller k"
            )

    def _index_dtype(self, num_classes):
        return np.uint16 if num_classes <= 2**16 else np.int32

    def encode(self, logits):
        num_classes = logits.shape[1]
        self.check(num_classes)
        top = np.argpartition(-logits, self.k - 1, axis=1)[:, : self.k]
        order = np.argsort(-np.take_along_axis(logits, top, axis=1), axis=1)  # largest first
        top = np.take_along_axis(top, order, axis=1)
        values = _to_float16(np.take_along_axis(logits, top, axis=1))
        rest = logits.astype(np.float64)
        np.put_along_axis(rest, top, -np.inf, axis=1)
        peak = rest.max(axis=1, keepdims=True)
        log_mass = peak[:, 0] + np.log(np.exp(rest - peak).sum(axis=1))
        tail = np.minimum(log_mass - math.log(num_classes - self.k), values[:, -1]).astype(np.float32)
        return {"logits": values, "indices": top.astype(self._index_dtype(num_classes)), "tail": tail}

    def decode(self, arrays, num_classes):
        # Format 2 stores hold float32 values: the cast reads both.
        out = np.repeat(arrays["tail"][:, None], num_classes, axis=1)
        values = arrays["logits"].astype(np.float32)
        np.put_along_axis(out, arrays["indices"].astype(np.int64), values, axis=1)
        return out

    def bytes_per_row(self, num_classes):
        index_bytes = np.dtype(self._index_dtype(num_classes)).itemsize
        return self.k * (2 + index_bytes) + 4


DEFAULT_TOPK = 10  # what `topk` alone means
# From this many classes on, precompute's default is top-k with this k: 92 B per view-sample
# at C = 1000, 4.6% of dense float16 (docs/store-format.md, "Top-k and the losses").
TOPK_FROM_CLASSES = 500
TOPK_DEFAULT_K = 20


def default_encoding(num_classes: int) -> str:
    """The encoding precompute uses unless told: dense float16 below TOPK_FROM_CLASSES
    classes, where a row costs at most 1 kB, else top-k, where dense rows dominate a store."""
    return "float16" if num_classes < TOPK_FROM_CLASSES else f"topk:{TOPK_DEFAULT_K}"


def warn_if_loss_needs_full_logits(loss, encoding: str) -> None:
    """Warn once when `loss` (a `DistillLoss`) reads the teacher's distribution beyond its top
    classes (`loss.needs_full_distribution`: softened at T > 1) but the store keeps only
    the top k logits of each row."""
    enc = get_encoding(encoding)
    if isinstance(enc, TopKEncoding) and loss.needs_full_distribution:
        warn_once(
            f"loss '{loss.name}' softens the teacher ({loss.temperature}={loss.params[loss.temperature]:g}), "
            f"which spreads its mass beyond the top {enc.k} logits this store keeps ({enc.name}) and changes "
            f"the loss's gradients; use {loss.temperature}=1 or a float16 store "
            "(docs/store-format.md, \"Top-k and the losses\")"
        )


def get_encoding(name: str) -> Encoding:
    """Encoding by name: `float16`, `int8`, `topk` (k=10) or `topk:K`."""
    if name == "float16":
        return Float16Encoding()
    if name == "int8":
        return Int8Encoding()
    if name == "topk":
        return TopKEncoding(DEFAULT_TOPK)
    if isinstance(name, str) and name.startswith("topk:") and name[5:].isascii() and name[5:].isdigit():
        return TopKEncoding(int(name[5:]))
    raise KdcacheError(f"unknown encoding {name!r}; choose one of {', '.join(list_encodings())}")


def list_encodings() -> list[str]:
    return ["float16", "int8", "topk", "topk:K"]


def logit_errors(reference: torch.Tensor, decoded: torch.Tensor) -> dict[str, float]:
    """How far decoded logits are from the reference, in the terms distillation cares
    about: max absolute logit error and mean KL(softmax(ref/T) || softmax(dec/T))."""
    reference = torch.as_tensor(reference).to(torch.float64)
    decoded = torch.as_tensor(decoded).to(torch.float64)
    if reference.shape != decoded.shape:
        raise KdcacheError(
            f"reference logits have shape {tuple(reference.shape)}, "
            f"the slab has {tuple(decoded.shape)}; pass the logits of the same slab"
        )
    result = {"max_abs_error": float((reference - decoded).abs().max())}
    for temperature in (1, 4):
        log_p = torch.log_softmax(reference / temperature, dim=1)
        log_q = torch.log_softmax(decoded / temperature, dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
        result[f"mean_kl_t{temperature}"] = float(kl.mean())
    return result


def measure_encoding(logits: torch.Tensor, encoding: str) -> dict[str, float]:
    """Encode and decode float32 logits with `encoding`; report the errors and size."""
    enc = get_encoding(encoding)
    source = torch.as_tensor(logits).detach().to("cpu", torch.float32).numpy()
    decoded = enc.decode(enc.encode(source), source.shape[1])
    return {
        "encoding": enc.name,
        "bytes_per_row": enc.bytes_per_row(source.shape[1]),
        **logit_errors(torch.from_numpy(source), torch.from_numpy(decoded)),
    }
