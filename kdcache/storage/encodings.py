"""How a slab's float32 logits become the arrays stored on disk, and back.

Each encoding turns logits float32 [N, C] into named numpy arrays (always a `logits`
array, plus per-encoding side arrays) and decodes any rows of them back to float32 with
torch, on whatever device they are (training decodes a batch's rows on its device). The
name of the encoding is part of a store's identity, so it is canonical (`topk` -> `topk:10`).
Every encoding works row by row, so a slab can be encoded and measured in blocks of rows.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from kdcache.errors import KdcacheError, warn_once

_FLOAT16_MAX = float(np.finfo(np.float16).max)
SAMPLE = "sample"  # the row dimension every array of a slab shares


def as_torch(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A stored array as a torch tensor sharing its memory; unsigned 16 and 64-bit arrays
    (top-k indices, seeds) become the signed type of the same width holding the same bit
    patterns, as torch supports those on every device."""
    if isinstance(array, torch.Tensor):
        return array
    signed = {np.dtype(np.uint16): np.int16, np.dtype(np.uint64): np.int64}.get(array.dtype)
    return torch.from_numpy(array if signed is None else array.view(signed))


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

    def decode(self, arrays: Mapping[str, torch.Tensor | np.ndarray], num_classes: int) -> torch.Tensor:
        """float32 [B, C] from the encoded arrays of B rows: numpy arrays, or torch tensors on
        any device as `as_torch` holds them (training decodes a batch there; no host sync)."""
        return self._decode({name: as_torch(arrays[name]) for name in self.array_names}, num_classes)

    def _decode(self, arrays: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
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

    def _decode(self, arrays, num_classes):
        return arrays["logits"].float()

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

    def _decode(self, arrays, num_classes):
        return arrays["offset"][:, None] + arrays["scale"][:, None] * arrays["logits"].float()

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

    def _decode(self, arrays, num_classes):
        indices = arrays["indices"].long()
        if arrays["indices"].dtype == torch.int16:  # uint16 held as int16 bit patterns (as_torch)
            indices = indices & 0xFFFF
        # Format 2 stores hold float32 values: the cast reads both.
        return arrays["tail"][:, None].repeat(1, num_classes).scatter_(1, indices, arrays["logits"].float())

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


# Rows per block when a slab is encoded or measured piecewise: 2**16 values, so each float64
# temporary of the error measure is 512 KiB whatever the slab's size. Measured writing a
# 50,000 x 1000 top-k slab (2-core CPU): peak RSS +150 MB over the imports with blocks of 2**16
# values, as without the measure; +260 MB with 2**20, and slower.
BLOCK_VALUES = 2**16


def block_rows(num_classes: int) -> int:
    return max(1, BLOCK_VALUES // num_classes)


def _check_same_shape(reference: torch.Tensor, decoded: torch.Tensor) -> None:
    if reference.shape != decoded.shape:
        raise KdcacheError(
            f"reference logits have shape {tuple(reference.shape)}, "
            f"the slab has {tuple(decoded.shape)}; pass the logits of the same slab"
        )


class LogitErrors:
    """How far decoded logits are from the reference, in the terms distillation cares
    about: max absolute logit error and mean KL(softmax(ref/T) || softmax(dec/T)), T = 1, 4.

    Fed block by block (`add`), so a slab is measured without holding it whole; the max
    and the means stream exactly (the KL sums are float64)."""

    TEMPERATURES = (1, 4)

    def __init__(self):
        self.rows = 0
        self.max_abs_error = 0.0
        self.kl_sums = dict.fromkeys(self.TEMPERATURES, 0.0)

    def add(self, reference, decoded) -> None:
        reference = torch.as_tensor(reference).to(torch.float64)
        decoded = torch.as_tensor(decoded).to(torch.float64)
        _check_same_shape(reference, decoded)
        if not reference.numel():
            return
        self.rows += reference.shape[0]
        self.max_abs_error = max(self.max_abs_error, float((reference - decoded).abs().max()))
        for temperature in self.TEMPERATURES:
            log_p = torch.log_softmax(reference / temperature, dim=1)
            log_q = torch.log_softmax(decoded / temperature, dim=1)
            self.kl_sums[temperature] += float((log_p.exp() * (log_p - log_q)).sum())

    def result(self) -> dict[str, float]:
        return {"max_abs_error": self.max_abs_error,
                **{f"mean_kl_t{t}": total / max(self.rows, 1) for t, total in self.kl_sums.items()}}


def logit_errors(reference: torch.Tensor, decoded: torch.Tensor) -> dict[str, float]:
    """`LogitErrors` of two [N, C] tensors, measured a block of rows at a time."""
    reference, decoded = torch.as_tensor(reference), torch.as_tensor(decoded)
    _check_same_shape(reference, decoded)
    errors = LogitErrors()
    step = block_rows(reference.shape[1])
    for start in range(0, reference.shape[0], step):
        errors.add(reference[start:start + step], decoded[start:start + step])
    return errors.result()


def measure_encoding(logits: torch.Tensor, encoding: str) -> dict[str, float]:
    """Encode and decode float32 logits [N, C] with `encoding`, a block of rows at a time;
    report the errors and size."""
    enc = get_encoding(encoding)
    logits = torch.as_tensor(logits).detach()
    errors = LogitErrors()
    step = block_rows(logits.shape[1])
    for start in range(0, logits.shape[0], step):
        source = logits[start:start + step].to("cpu", torch.float32).numpy()
        errors.add(source, enc.decode(enc.encode(source), source.shape[1]))
    return {"encoding": enc.name, "bytes_per_row": enc.bytes_per_row(logits.shape[1]), **errors.result()}
