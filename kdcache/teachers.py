"""Where a student's teacher logits come from: the store (cached) or a live model (online).

Both answer `logits(round, slot, views, indices)`: the cached teacher looks rows up in the
in-memory slab of that round and slot by sample index; the online teacher runs the model
on the views. Same views, same logits (to the store's encoding precision).
"""

from __future__ import annotations

import torch
from torch import nn

from kdcache.storage import LogitStore, SlabPrefetcher


class CachedTeacher:
    """Teacher logits from a store; slabs of the next round load in the background."""

    def __init__(self, store: LogitStore, slots: list[str], epochs: int, rounds: int | None = None):
        self.store = store
        self.slots = list(slots)
        self.rounds = rounds or store.rounds  # a student may use only the store's first rounds
        self.epochs = epochs
        self._prefetcher: SlabPrefetcher | None = None
        self._slabs: dict[str, torch.Tensor] = {}
        self._loaded_round: int | None = None

    def _start_prefetch(self, first_epoch: int) -> None:
        """Queue the slabs of every round from `first_epoch` on, in the order training uses them."""
        keys: list[tuple[int, str]] = []
        last = None
        for epoch in range(first_epoch, self.epochs):
            round_ = self.round_of(epoch)
            if round_ != last:
                keys += [(round_, slot) for slot in self.slots]
                last = round_
        self._prefetcher = SlabPrefetcher(self.store, keys)
        self._next_slab = iter(self._prefetcher)

    def round_of(self, epoch: int) -> int:
        """Epochs cycle through the store's rounds when there are more epochs than rounds."""
        return epoch % self.rounds

    def begin_epoch(self, epoch: int) -> int:
        if self._prefetcher is None:
            self._start_prefetch(epoch)
        round_ = self.round_of(epoch)
        if round_ != self._loaded_round:
            self._slabs = {}
            for _ in self.slots:
                (key_round, slot), slab = next(self._next_slab)
                assert key_round == round_, (key_round, round_)
                self._slabs[slot] = slab
            self._loaded_round = round_
        return round_

    @torch.no_grad()
    def logits(self, round_: int, slot: str, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        del views  # the cache needs only the sample indices
        assert round_ == self._loaded_round
        return self._slabs[slot].index_select(0, indices.cpu()).to(indices.device, non_blocking=True)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()


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
