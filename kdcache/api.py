"""Train from a logit store in your own PyTorch loop, with your own model and optimizer.

Everything a hand-written loop needs, without kdcache's training engine (docs/api.md):

- `open_store(store, data_dir, slots)`: the store, checked to come from that data;
- `make_loader(data_dir, "train", batch_size, shuffle=True)`: batches of
  (uint8 images [B,3,H,W], int64 labels [B], int64 sample indices [B]);
- `replayer_for(store)`: `replay(round, slot, images, indices)` gives the normalised
  views the teacher saw when the store was made;
- `TeacherLogits(store)`: `teacher(round, slot, indices)` gives the stored teacher logits
  of those views, for rounds visited in any order;
- `eval_views(images, mean, std)`: the un-augmented normalised view to evaluate on;
- `StoreDataset`: the same, as a torch `Dataset` for your own `DataLoader`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from kdcache.data import DatasetMeta, load_split, make_loader
from kdcache.replay import ViewReplayer, check_store, eval_views, replayer_for
from kdcache.storage import EncodedRows, LogitStore
from kdcache.teachers import DeviceSlabs

__all__ = [
    "DatasetMeta", "LogitStore", "StoreDataset", "StoreSample", "TeacherLogits", "ViewReplayer",
    "eval_views", "make_loader", "open_store", "replayer_for",
]


def open_store(store: str | Path, data_dir: str | Path, slots: list[str] | tuple[str, ...] = ()) -> LogitStore:
    """Open a store read-only, refusing one made from other data or lacking `slots`.

    A store replays views from the training images of `data_dir`; with other images
    the student would silently see other pixels than the teacher did.
    """
    opened = LogitStore.open(store)
    check_store(opened, DatasetMeta.load(data_dir), tuple(slots))
    return opened


class TeacherLogits:
    """The stored teacher logits of views, looked up by (round, slot, sample indices).

    Rounds may be visited in any order. The slabs of the round last asked for stay in
    memory on `device`, still encoded (as kdcache's own training keeps them: N rows per
    slot of float16 for float16 stores, of top-k values, indices and tails for top-k
    ones), and a call decodes the rows it asks for; asking for another round reads that
    round's slabs and drops the previous ones, so visit all batches of a round before moving on.
    """

    def __init__(self, store: LogitStore, device: str | torch.device = "cpu"):
        self.store = store
        self.device = torch.device(device)
        self.round: int | None = None
        self._source = DeviceSlabs(store, self.device)
        self._slabs: dict[str, EncodedRows] = {}

    def slab(self, round_: int, slot: str) -> EncodedRows:
        """All N rows of (round, slot), encoded, on `device`, read from the store once per
        round visit; `.logits(indices)` decodes some of them."""
        if round_ != self.round:
            self._slabs = {}
            self.round = round_
        if slot not in self._slabs:
            self._slabs[slot] = self._source.load(round_, slot)
        return self._slabs[slot]

    def __call__(self, round_: int, slot: str, indices: torch.Tensor) -> torch.Tensor:
        """float32 [B, C] logits of the views (round, slot, indices), on the device of `indices`."""
        rows = self.slab(round_, slot).logits(indices.to(self.device))
        return rows.to(indices.device, non_blocking=True)


class StoreSample(NamedTuple):
    """One training sample of a `StoreDataset`; a DataLoader collates each field into a batch."""

    views: list[torch.Tensor]  # float32 [3,S,S] per slot, in the dataset's slot order
    teacher_logits: list[torch.Tensor]  # float32 [C] per slot: the stored logits of those views
    label: torch.Tensor  # int64 scalar
    index: torch.Tensor  # int64 scalar: the sample's index in the training split


class StoreDataset(torch.utils.data.Dataset):
    """The training split with each sample's replayed views and their stored teacher logits.

    For your own `DataLoader` (any sampler, batch size, workers). Item `i` is a
    `StoreSample` for the views `(store seed, round, slot, i)` of every slot in `slots`
    (default: all the store's slots), so `views` and `teacher_logits` are lists indexed
    like a kdcache loss's `views`. `round` (then `set_round(r)`) selects the round; rounds
    may be visited in any order.

    Cost: a DataLoader with a batch size fetches a batch through `__getitems__`, which
    replays the whole batch in one call to each view policy. Indexing one item
    (`dataset[i]`, or a DataLoader with `batch_size=None`) replays a batch of one: the
    same views, 10-50x slower per image on a CPU (32x32 weak: 0.26 ms against 0.03 ms;
    strong: 1.1 ms against 0.09 ms, one thread). The training images are held in memory as uint8
    (`load_split`), so this suits datasets of CIFAR size; for larger ones use
    `make_loader` (FFCV) with `replayer_for` and `TeacherLogits` in your loop.

    Workers: the round's slabs are read in the process calling `set_round`, and workers
    get them when the DataLoader starts them, at each new iteration. With
    `persistent_workers=True` the workers keep the round they started with; do not use it.
    """

    def __init__(self, data_dir: str | Path, store: str | Path, slots: list[str] | tuple[str, ...] | None = None,
                 round: int = 0):
        self.store = open_store(store, data_dir, slots or ())
        self.slots = list(slots) if slots else self.store.views
        self.replay = replayer_for(self.store)
        self.teacher = TeacherLogits(self.store)
        self.images, self.labels = load_split(data_dir, "train")
        self.set_round(round)

    def set_round(self, round_: int) -> None:
        """Serve the views of round `round_` from now on (any round, in any order)."""
        for slot in self.slots:
            self.teacher.slab(round_, slot)
        self.round = round_

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> StoreSample:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[StoreSample]:
        """The samples of `indices`, their views replayed as one batch per slot."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if len(idx) and not (0 <= int(idx.min()) and int(idx.max()) < len(self)):
            raise IndexError(f"sample indices must lie in 0..{len(self) - 1}, got {int(idx.min())}..{int(idx.max())}")
        images = self.images.index_select(0, idx)
        views = [self.replay(self.round, slot, images, idx) for slot in self.slots]
        logits = [self.teacher(self.round, slot, idx) for slot in self.slots]
        labels = self.labels.index_select(0, idx)
        return [StoreSample([v[i] for v in views], [z[i] for z in logits], labels[i], idx[i]) for i in range(len(idx))]
