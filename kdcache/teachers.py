"""Where a student's teacher logits come from: the store (cached) or a live model (online).

Both answer `logits(round, slot, views, indices)`: the cached teacher holds the encoded
rows of the samples this rank visits in the epoch, resident on the training device, and
decodes the batch's rows there (no host sync); the online teacher runs the model on the
views. Same views, same logits (to the store's encoding precision).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from kdcache.storage import EncodedRows, LogitStore, SlabPrefetcher


class DeviceSlabs:
    """A slab's encoded rows (all, or some) on the training device, for the prefetch thread.

    The rows stay encoded there (float16, int8 codes and scales, top-k values, indices and
    tails) and are decoded a batch at a time. On CUDA the copy runs from pinned memory on
    a side stream and this (background) thread waits for it, so the training stream never does.
    """

    def __init__(self, store: LogitStore, device: torch.device):
        self.store, self.device = store, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def load(self, round_: int, view: str, rows: np.ndarray | None = None) -> EncodedRows:
        host = self.store.slab_rows(round_, view, rows)
        if self.stream is None:
            return host.to(self.device)
        with torch.cuda.stream(self.stream):
            encoded = host.pin_memory().to(self.device, non_blocking=True)
        self.stream.synchronize()
        return encoded


class CachedTeacher:
    """Teacher logits from a store; the rows of the next epoch load in the background.

    Without `visit`, it holds every row of the round's slabs (a round is loaded once for
    all the epochs in a row that use it). After `visit(rows_of)` it holds, per epoch, only
    the rows `rows_of(epoch)` lists (the loader's order for this rank: its shard, which
    changes every epoch), so memory per rank follows the rank's share of the data.
    Rounds may be asked for in any order (a resume, a user's own schedule): an epoch that
    is not the one prefetched is loaded on the spot and prefetching restarts from there.
    """

    def __init__(self, store: LogitStore, slots: list[str], epochs: int, rounds: int | None = None,
                 device: torch.device | str = "cpu"):
        self.store = store
        self.slots = list(slots)
        self.rounds = rounds or store.rounds  # a student may use only the store's first rounds
        self.epochs = epochs
        self._source = DeviceSlabs(store, torch.device(device))
        self._rows_of: Callable[[int], np.ndarray] | None = None
        self._prefetcher: SlabPrefetcher | None = None
        self._slabs: dict[str, EncodedRows] = {}
        self._loaded: tuple[int, int | None] | None = None  # (round, epoch of the rows; None: all rows)

    def round_of(self, epoch: int) -> int:
        """Epochs cycle through the store's rounds when there are more epochs than rounds."""
        return epoch % self.rounds

    def visit(self, rows_of: Callable[[int], np.ndarray]) -> None:
        """Hold only the rows `rows_of(epoch)` lists in each epoch (sample indices in any
        order, repeats allowed: e.g. the loader's `order`); the prefetch thread calls `rows_of`."""
        self.close()
        self._rows_of, self._slabs, self._loaded = rows_of, {}, None

    def _key(self, epoch: int) -> tuple[int, int | None]:
        """What one epoch needs loaded: its round, and the epoch when rows depend on it."""
        return self.round_of(epoch), None if self._rows_of is None else epoch

    def _load(self, round_: int, epoch: int | None, slot: str) -> EncodedRows:
        rows = None if epoch is None else np.unique(self._rows_of(epoch))
        return self._source.load(round_, slot, rows)

    def _prefetch_from(self, epoch: int) -> None:
        """Queue the slabs of every epoch from `epoch` on, in the order training uses them."""
        keys: list[tuple[int, int | None, str]] = []
        for e in range(epoch, max(self.epochs, epoch + 1)):
            if e == epoch or self._key(e) != self._key(e - 1):
                keys += [(*self._key(e), slot) for slot in self.slots]
        self.close()
        self._prefetcher = SlabPrefetcher(self._load, keys)
        self._next_slab = iter(self._prefetcher)

    def _take(self, key: tuple[int, int | None]) -> dict[str, EncodedRows] | None:
        """The prefetched slabs of `key`, or None when the prefetcher holds another."""
        slabs = {}
        for slot in self.slots:
            item = next(self._next_slab, None)
            if item is None or item[0] != (*key, slot):
                return None
            slabs[slot] = item[1]
        return slabs

    def begin_epoch(self, epoch: int) -> int:
        """Make the rows of this epoch's round resident; returns the round."""
        key = self._key(epoch)
        if key == self._loaded:
            return key[0]
        self._slabs = {}  # free the old rows' device memory before the new ones land
        slabs = self._take(key) if self._prefetcher is not None else None
        if slabs is None:
            self._prefetch_from(epoch)
            slabs = self._take(key)
        if self._source.stream is not None:  # made on the side stream, used on this one
            for slab in slabs.values():
                slab.record_stream(torch.cuda.current_stream(self._source.device))
        self._slabs, self._loaded = slabs, key
        return key[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held for the current epoch (encoded arrays and lookup tables)."""
        return sum(slab.nbytes for slab in self._slabs.values())

    @torch.no_grad()
    def logits(self, round_: int, slot: str, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """float32 logits of the views (slot, indices) of the loaded round; `views` is unused."""
        if self._loaded is None or round_ != self._loaded[0]:
            loaded = None if self._loaded is None else self._loaded[0]
            raise RuntimeError(f"round {round_} is not loaded (round {loaded} is); call begin_epoch")
        return self._slabs[slot].logits(indices)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None


class OnlineTeacher:
    """A live teacher model in eval mode: the baseline the cache must reproduce."""

    def __init__(self, model: nn.Module, rounds: int | None = None):
        self.model = model.eval().requires_grad_(False)
        self.rounds = rounds

    def round_of(self, epoch: int) -> int:
        # With a store's round count, online training sees the same views as cached training.
        return epoch % self.rounds if self.rounds else epoch

    def begin_epoch(self, epoch: int) -> int:
        return self.round_of(epoch)

    def visit(self, rows_of) -> None:
        """Nothing to hold: a live model answers for any sample."""

    @torch.no_grad()
    def logits(self, round_: int, slot: str, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.model(views).float()

    def close(self) -> None:
        pass
