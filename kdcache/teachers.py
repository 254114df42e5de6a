"""Where a student's teacher logits come from: the store (cached) or a live model (online).

Both answer `logits(round, slot, views, indices)`: the cached teacher gathers rows of
that round's slab, resident on the training device, with the batch's device indices (no
host sync); the online teacher runs the model on the views. Same views, same logits (to
the store's encoding precision).
"""

from __future__ import annotations

import torch
from torch import nn

from kdcache.storage import LogitStore, SlabPrefetcher


class DeviceSlabs:
    """`slab(round, view)` on the training device, for the prefetch thread to call.

    Slabs of a float16 store stay float16 on the device (exact, half the memory); other
    encodings decode to float32. On CUDA the copy runs from pinned memory on a side
    stream and this (background) thread waits for it, so the training stream never does.
    """

    def __init__(self, store: LogitStore, device: torch.device):
        self.store, self.device = store, device
        self.dtype = torch.float16 if store.encoding == "float16" else torch.float32
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def slab(self, round_: int, view: str) -> torch.Tensor:
        host = self.store.slab(round_, view).to(self.dtype)
        if self.stream is None:
            return host.to(self.device)
        with torch.cuda.stream(self.stream):
            slab = host.pin_memory().to(self.device, non_blocking=True)
        self.stream.synchronize()
        return slab


class CachedTeacher:
    """Teacher logits from a store; the slabs of the next round load in the background.

    Rounds may be asked for in any order (a resume, a user's own schedule): a round that
    is not the one prefetched is loaded on the spot and prefetching restarts from there.
    """

    def __init__(self, store: LogitStore, slots: list[str], epochs: int, rounds: int | None = None,
                 device: torch.device | str = "cpu"):
        self.store = store
        self.slots = list(slots)
        self.rounds = rounds or store.rounds  # a student may use only the store's first rounds
        self.epochs = epochs
        self._source = DeviceSlabs(store, torch.device(device))
        self._prefetcher: SlabPrefetcher | None = None
        self._slabs: dict[str, torch.Tensor] = {}
        self._loaded_round: int | None = None

    def round_of(self, epoch: int) -> int:
        """Epochs cycle through the store's rounds when there are more epochs than rounds."""
        return epoch % self.rounds

    def _prefetch_from(self, epoch: int) -> None:
        """Queue the slabs of every round from `epoch` on, in the order training uses them."""
        keys: list[tuple[int, str]] = []
        for e in range(epoch, max(self.epochs, epoch + 1)):
            if e == epoch or self.round_of(e) != self.round_of(e - 1):
                keys += [(self.round_of(e), slot) for slot in self.slots]
        self.close()
        self._prefetcher = SlabPrefetcher(self._source, keys)
        self._next_slab = iter(self._prefetcher)

    def _take(self, round_: int) -> dict[str, torch.Tensor] | None:
        """The prefetched slabs of `round_`, or None when the prefetcher holds another round."""
        slabs = {}
        for slot in self.slots:
            item = next(self._next_slab, None)
            if item is None or item[0] != (round_, slot):
                return None
            slabs[slot] = item[1]
        return slabs

    def begin_epoch(self, epoch: int) -> int:
        """Make the slabs of this epoch's round resident; returns the round."""
        round_ = self.round_of(epoch)
        if round_ == self._loaded_round:
            return round_
        self._slabs = {}  # free the old round's device memory before the new one lands
        slabs = self._take(round_) if self._prefetcher is not None else None
        if slabs is None:
            self._prefetch_from(epoch)
            slabs = self._take(round_)
        if self._source.stream is not None:  # made on the side stream, used on this one
            for slab in slabs.values():
                slab.record_stream(torch.cuda.current_stream(slab.device))
        self._slabs, self._loaded_round = slabs, round_
        return round_

    @torch.no_grad()
    def logits(self, round_: int, slot: str, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """float32 logits of the views (slot, indices) of the loaded round; `views` is unused."""
        if round_ != self._loaded_round:
            raise RuntimeError(f"round {round_} is not loaded (round {self._loaded_round} is); call begin_epoch")
        return self._slabs[slot].index_select(0, indices).float()

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

    @torch.no_grad()
    def logits(self, round_: int, slot: str, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.model(views).float()

    def close(self) -> None:
        pass
