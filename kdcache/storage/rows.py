"""Rows of a slab held still encoded, decoded a batch at a time on their device.

Training holds only what it will read: the encoded rows of the samples a rank visits
(top-k: 84 B per row at k = 20, against 4 kB decoded at C = 1000), on the training device,
and decodes each batch's rows there. Nothing in a lookup reads a device value on the host.
"""

from __future__ import annotations

import torch

from kdcache.storage.encodings import Encoding


def lookup_table(rows: torch.Tensor, num_samples: int) -> torch.Tensor:
    """int32 [num_samples]: the position of each sample among `rows` (sorted sample indices),
    -1 for samples not held (4 bytes per sample: 5 MB for 1.28M)."""
    table = torch.full((num_samples,), -1, dtype=torch.int32)
    table[rows] = torch.arange(len(rows), dtype=torch.int32)
    return table


class EncodedRows:
    """Encoded arrays of some rows of one slab (torch tensors on one device), looked up by
    sample index: `logits(indices)` decodes those rows to float32 [B, C].

    `position` (int32 [N], see `lookup_table`) maps a sample index to its row in the arrays;
    None means the arrays hold every row, in sample order.
    """

    def __init__(self, encoding: Encoding, num_classes: int, arrays: dict[str, torch.Tensor],
                 position: torch.Tensor | None = None):
        self.encoding, self.num_classes, self.arrays, self.position = encoding, num_classes, arrays, position

    def _map(self, fn) -> EncodedRows:
        return EncodedRows(self.encoding, self.num_classes, {k: fn(a) for k, a in self.arrays.items()},
                           None if self.position is None else fn(self.position))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EncodedRows:
        return self._map(lambda a: a.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> EncodedRows:
        return self._map(lambda a: a.pin_memory())

    def _tensors(self) -> list[torch.Tensor]:
        """Every tensor held: the encoded arrays and the lookup table."""
        return [*self.arrays.values(), *([] if self.position is None else [self.position])]

    def record_stream(self, stream) -> None:
        """Tell the CUDA allocator that `stream` uses these tensors (made on another stream)."""
        for tensor in self._tensors():
            tensor.record_stream(stream)

    @property
    def nbytes(self) -> int:
        """Bytes held: the encoded arrays and the lookup table."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def logits(self, indices: torch.Tensor) -> torch.Tensor:
        """float32 [B, C] logits of the samples `indices` (on this device; all among the rows held)."""
        positions = indices if self.position is None else self.position.index_select(0, indices)
        batch = {name: array.index_select(0, positions) for name, array in self.arrays.items()}
        return self.encoding.decode(batch, self.num_classes)
