"""Batches of (uint8 images [B,3,H,W], int64 labels [B], int64 indices [B]) from a prepared dir.

Order: `epoch_order` is the only source of sample order. It is a numpy permutation seeded
by (seed, epoch) (`np.random.default_rng([seed, epoch])`), or 0..N-1 without shuffling,
then sharded like torch's DistributedSampler (drop_last=False): padded by repeating its
head to a multiple of world_size, and rank r takes order[r::world_size].

Both backends consume that exact order:
- "memory": the whole split as one uint8 tensor on `device`; a batch is index_select.
- "ffcv": one ffcv Loader per make_loader call, built with OrderOption.SEQUENTIAL and
  `indices=` the first epoch's order. In ffcv 1.0.2, Sequential.sample_order returns its
  `indices` unchanged, so each epoch we set the traversal order's `indices` to that
  epoch's order (same length, so ffcv's __len__ stays right) and reuse the compiled Loader.
  The index field read back from the file is checked against the requested order.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from kdcache.data.beton import BetonFile, torch_threads_kept
from kdcache.data.meta import DatasetMeta
from kdcache.errors import KdcacheError, warn_once

BACKENDS = ("auto", "memory", "ffcv")
MEMORY_FRACTION = 0.25  # "auto" uses memory when the split takes at most this share of RAM / GPU memory
FFCV_THREADS = min(2, os.cpu_count() or 1)


def open_split(data_dir: str | Path, split: str) -> BetonFile:
    """The split's beton, checked against the content check meta.json recorded for it."""
    if split not in ("train", "test"):
        raise KdcacheError(f"unknown split {split!r}; use 'train' or 'test'")
    meta = DatasetMeta.load(data_dir)
    beton = BetonFile(Path(data_dir) / f"{split}.beton")
    expected = meta.split_checks.get(split)
    if expected is None:
        warn_once(f"{data_dir}/meta.json records no content check of {split}.beton (written by kdcache "
                  f"{meta.kdcache_version}); it is used unchecked: re-run `kdcache data prepare` to add one")
    elif beton.content_check() != expected:
        raise KdcacheError(f"{beton.path} does not hold the data {data_dir}/meta.json describes (content check "
                           "differs: the file was replaced or damaged); re-run `kdcache data prepare --overwrite`")
    if beton.num_samples != meta.counts[split]:
        raise KdcacheError(f"{beton.path} holds {beton.num_samples} samples, meta.json says {meta.counts[split]}; "
                           "re-run `kdcache data prepare --overwrite`")
    return beton


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """The sample indices (int64) rank `rank` visits in epoch `epoch`; see the module docstring."""
    if not 0 <= rank < world_size:
        raise KdcacheError(f"rank must lie in 0..world_size-1, got rank={rank} world_size={world_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_rank = -(-n // world_size)
    order = np.resize(order, per_rank * world_size)  # repeats the head to pad, like DistributedSampler
    return order[rank::world_size].astype(np.int64)


def load_split(data_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split in index order: (uint8 [N,3,H,W], int64 [N]). Raw betons are parsed
    with numpy (no ffcv needed); JPEG betons are decoded by ffcv."""
    beton = open_split(data_dir, split)
    if beton.own_size:
        raise KdcacheError(f"{beton.path} holds images of their own sizes, which do not stack into one tensor: "
                           "`kdcache views show` and StoreDataset do not read such data yet (training, verify, "
                           "precompute and eval do); in Python use make_loader(..., replayer=...)")
    return _read_split(beton)


def _read_split(beton: BetonFile) -> tuple[torch.Tensor, torch.Tensor]:
    if not np.array_equal(beton.indices, np.arange(beton.num_samples)):
        raise KdcacheError(f"{beton.path}: index field is not 0..N-1; re-run `kdcache data prepare --overwrite`")
    if beton.is_raw:
        return torch.from_numpy(beton.read_raw_images()), torch.from_numpy(beton.labels)
    loader = FfcvLoader(beton, 1024, shuffle=False, seed=0, device="cpu", drop_last=False, rank=0, world_size=1)
    images, labels, _ = (torch.cat(parts) for parts in zip(*loader))
    return images, labels


def make_loader(data_dir: str | Path, split: str, batch_size: int, *, shuffle: bool, seed: int = 0,
                backend: str = "auto", device: str | torch.device = "cpu", drop_last: bool = False,
                rank: int = 0, world_size: int = 1, replayer=None) -> "MemoryLoader | FfcvLoader | CropLoader":
    """A re-iterable loader; call `set_epoch(e)` before each epoch to get that epoch's order.

    Data of images of their own sizes (`DatasetMeta.own_size`) gives a `CropLoader`: it needs
    the `replayer` (`kdcache.replay.ViewReplayer`) whose views it cuts, chosen per pass with
    `set_views(round, slots)`; other loaders ignore both."""
    if backend not in BACKENDS:
        raise KdcacheError(f"unknown loader backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if batch_size < 1:
        raise KdcacheError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    beton = open_split(data_dir, split)
    args = dict(shuffle=shuffle, seed=seed, device=device, drop_last=drop_last, rank=rank, world_size=world_size)
    if beton.own_size:
        if replayer is None:
            raise KdcacheError(f"{beton.path} holds images of their own sizes, whose views are cut at decode time: "
                               "pass the views' replayer (make_loader(..., replayer=replayer_for(store)))")
        if backend == "memory" or not _has_ffcv():
            raise KdcacheError(f"{beton.path} holds images of their own sizes, which only the ffcv backend reads "
                               "(views are cut at decode time); install ffcv and use backend 'ffcv' or 'auto'")
        return CropLoader(beton, batch_size, replayer, **args)
    if backend == "auto":
        backend = "memory" if _fits_in_memory(beton, device) or not _has_ffcv() else "ffcv"
    if backend == "memory":
        return MemoryLoader(*_read_split(beton), batch_size, **args)
    if not _has_ffcv():
        raise KdcacheError("the ffcv backend needs the ffcv package; install it or use backend='memory'")
    return FfcvLoader(beton, batch_size, **args)


def _has_ffcv() -> bool:
    try:
        with torch_threads_kept():
            import ffcv  # noqa: F401
    except ImportError:
        return False
    return True


def _fits_in_memory(beton: BetonFile, device: torch.device) -> bool:
    nbytes = beton.num_samples * 3 * beton.height * beton.width
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
    else:
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return nbytes <= MEMORY_FRACTION * capacity


class _Batches:
    """What both backends share: the epoch, the order and the batch count."""

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, seed: int, device: torch.device,
                 drop_last: bool, rank: int, world_size: int):
        self.num_samples, self.batch_size, self.device, self.drop_last = num_samples, batch_size, device, drop_last
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch = 0
        self.order()  # validates rank/world_size early

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_views(self, round_: int, slots) -> None:
        """Which views the next passes serve: only loaders that cut views at decode time
        (`CropLoader`) need to know; whole images serve every view."""

    def order(self, epoch: int | None = None) -> np.ndarray:
        """This epoch's (or `epoch`'s) sample indices for this rank, cut to whole batches when drop_last."""
        order = epoch_order(self.num_samples, shuffle=self.shuffle, seed=self.seed,
                            epoch=self.epoch if epoch is None else epoch, rank=self.rank, world_size=self.world_size)
        return order[:len(self) * self.batch_size] if self.drop_last else order

    def __len__(self) -> int:
        per_rank = -(-self.num_samples // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)


class MemoryLoader(_Batches):
    """The split lives on `device` as one tensor; batches are gathered with index_select."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, **kw):
        super().__init__(len(labels), batch_size, **kw)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)

    def __iter__(self):
        order = torch.from_numpy(self.order()).to(self.device)
        for idx in order.split(self.batch_size):
            yield self.images.index_select(0, idx), self.labels.index_select(0, idx), idx


class FfcvLoader(_Batches):
    """Reads the beton with ffcv Loaders, each reused across epochs (building one costs ~1.5 s)."""

    def __init__(self, beton: BetonFile, batch_size: int, **kw):
        super().__init__(beton.num_samples, batch_size, **kw)
        self.path = beton.path
        self._loaders = {}

    def _ffcv_batches(self, order: np.ndarray, key, image_ops):
        """(images, labels, indices) of `order` from the Loader `key` (built on first use with
        the image pipeline `image_ops()`); only labels and indices are cloned."""
        if key not in self._loaders:
            with torch_threads_kept():
                from ffcv.fields.basics import IntDecoder
                from ffcv.loader import Loader, OrderOption
                from ffcv.transforms import ToTensor

                self._loaders[key] = Loader(
                    str(self.path), batch_size=self.batch_size, num_workers=FFCV_THREADS,
                    order=OrderOption.SEQUENTIAL,
                    # every sample: ffcv keeps a pass to its first order's length, and later orders may be longer
                    indices=np.arange(self.num_samples), drop_last=False, os_cache=True,
                    pipelines={"image": [*image_ops(), ToTensor()], "label": [IntDecoder(), ToTensor()],
                               "index": [IntDecoder(), ToTensor()]})
        loader = self._loaders[key]
        loader.traversal_order.indices = order
        expected = torch.from_numpy(order)
        start = 0
        with torch_threads_kept():
            batches = iter(loader)
        for images, labels, indices in batches:
            # ffcv reuses its output buffers: every tensor kept is a clone.
            indices = indices.reshape(-1).clone()
            if not torch.equal(indices, expected[start:start + len(indices)]):
                raise RuntimeError("ffcv returned samples out of the requested order")
            start += len(indices)
            yield images, labels.reshape(-1).clone().to(self.device), indices.to(self.device)

    def __iter__(self):
        from ffcv.fields.rgb_image import SimpleRGBImageDecoder

        for images, labels, indices in self._ffcv_batches(self.order(), None, lambda: [SimpleRGBImageDecoder()]):
            yield images.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format).to(self.device), labels, indices


class CropLoader(FfcvLoader):
    """Images of their own sizes: batches of views' boxes cut at decode time.

    Yields `({slot: uint8 [B,3,S,S]}, labels, indices)`: for each slot chosen with
    `set_views(round, slots)`, each sample's box of the view (round, slot, index), drawn by
    the slot's policy (`replayer`'s) from the view key and the image's size, decoded and
    resized to the policy's image size S (`kdcache.data.decode`). The replayer's
    `views(slot, ...)` finishes them (flip, RandAugment, cutout) on the device.
    """

    BOX_CHUNK = 1 << 16  # samples whose boxes are drawn at once (bounds the streams' memory)
    # ffcv Loaders and their box tables, per (file, batch size, views per sample, view size),
    # kept for the whole process: a collected Loader with a crop decoder makes numba print an
    # ignored KeyError (ffcv's own RandomResizedCropRGBImageDecoder does too), and evaluation
    # would rebuild one every epoch (~1.5 s). So two CropLoaders alike must not iterate at once.
    _shared_loaders: dict = {}
    _shared_tables: dict = {}

    def __init__(self, beton: BetonFile, batch_size: int, replayer, **kw):
        super().__init__(beton, batch_size, **kw)
        self.replayer, self.heights, self.widths = replayer, torch.from_numpy(beton.heights), torch.from_numpy(beton.widths)
        sizes = {policy.image_size for policy in replayer.policies.values()}
        if len(sizes) != 1:
            raise KdcacheError(f"the view slots make views of several sizes {sorted(sizes)}; use one image size")
        self.size = sizes.pop()
        for policy in replayer.policies.values():
            policy.crop_step()
        self.round, self.slots = 0, tuple(replayer.policies)
        self._loaders = self._shared_loaders

    def set_views(self, round_: int, slots) -> None:
        """The views the next passes yield: slots `slots` of round `round_`."""
        for slot in slots:
            self.replayer.key_prefix(round_, slot, torch.device("cpu"))  # refuses unknown slots and rounds
        self.round, self.slots = round_, tuple(slots)

    def _boxes(self, order: np.ndarray) -> np.ndarray:
        """The box table [N, V, 4] with the rows of `order` holding this pass's boxes."""
        key = self._key()
        if key not in self._shared_tables:
            self._shared_tables[key] = np.zeros((self.num_samples, len(self.slots), 4), dtype=np.int32)
        table = self._shared_tables[key]
        for chunk in torch.from_numpy(order).split(self.BOX_CHUNK):
            for v, slot in enumerate(self.slots):
                seeds = self.replayer.seeds(self.round, slot, chunk)
                boxes = self.replayer.policies[slot].crop_boxes(seeds, self.heights[chunk], self.widths[chunk])
                table[chunk.numpy(), v] = boxes.numpy()
        return table

    def _key(self):
        return (str(self.path.resolve()), self.batch_size, len(self.slots), self.size)

    def __iter__(self):
        return self.batches_of(self.order())

    def batches_of(self, order: np.ndarray):
        """The batches of the samples `order` (int64 indices), in that order, instead of the
        epoch's: `kdcache verify` recomputes a few stored views this way."""
        from kdcache.data.decode import crop_decoder

        table = self._boxes(order)
        for images, labels, indices in self._ffcv_batches(order, self._key(), lambda: [crop_decoder(table, self.size)]):
            # [B, V, S, S, 3] -> one contiguous [B, 3, S, S] per slot
            crops = images.permute(1, 0, 4, 2, 3).clone(memory_format=torch.contiguous_format).to(self.device)
            yield dict(zip(self.slots, crops)), labels, indices
