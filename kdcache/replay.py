"""The one function both stages call: (round, slot, sample indices) -> normalised views;
with it, what a store must match (`check_store`) and the evaluation view (`eval_views`).

Stage 1 (precompute) and stage 2 (distill, online or cached) build a `ViewReplayer` from
the same store identity, so a sample's view in round r, slot v is the same pixels in
both, whatever the batch it arrives in.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from kdcache.augment import ViewPolicy, get_policy, normalize, policy_from_spec
from kdcache.augment.policies import channel_constants
from kdcache.augment.seeds import key_prefix, seeds_from_prefix
from kdcache.errors import KdcacheError

if TYPE_CHECKING:  # annotations only: the replayer needs neither package at run time
    from kdcache.data import DatasetMeta
    from kdcache.storage import LogitStore

DEFAULT_VIEWS = {"weak": "weak", "strong": "strong"}
OWN_SIZE_IMAGE_SIZE = 224  # views of images of their own sizes, unless precompute's --image-size says otherwise
OWN_SIZE_EVAL_CROP = 0.875  # their evaluation view: torchvision's Resize(256) + CenterCrop(224)
EVAL_SLOT = "eval"


def parse_views(text: str) -> dict[str, str]:
    """Parse `--views`: `weak,strong` or `weak=imagenet_weak,strong=imagenet_strong` (slot=policy)."""
    views: dict[str, str] = {}
    for item in text.split(","):
        slot, _, policy = item.strip().partition("=")
        if not slot:
            raise KdcacheError(f"empty view slot in --views '{text}'")
        if slot in views:
            raise KdcacheError(f"view slot '{slot}' is given twice in --views '{text}'")
        views[slot] = policy or slot
    return views


class ViewReplayer:
    """Regenerates views from their keys (store_seed, round, slot, sample index).

    `slots` maps slot name -> policy spec (`ViewPolicy.spec()`); a slot's number in the
    key is its position in `slots`, the order the store records. `dense` picks the
    policies' path (None: the device path everywhere but on the CPU; see `ViewPolicy.apply`).
    Key prefixes and normalisation constants are made once per device and kept there.
    """

    def __init__(self, slots: dict[str, dict[str, Any]], store_seed: int, mean, std, dense: bool | None = None):
        self.slot_specs = dict(slots)
        self.slot_ids = {slot: i for i, slot in enumerate(slots)}
        self.store_seed = int(store_seed)
        self.policies = {slot: policy_from_spec(spec) for slot, spec in slots.items()}
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.dense = dense
        self._prefixes: dict[tuple[int, str, torch.device], torch.Tensor] = {}
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_policy_names(cls, views: dict[str, str], store_seed: int, image_size: int, mean, std) -> "ViewReplayer":
        specs = {slot: get_policy(policy, image_size).spec() for slot, policy in views.items()}
        return cls(specs, store_seed, mean, std)

    @property
    def image_size(self) -> int:
        """The side of the views (every slot's policy makes views of one size)."""
        return next(iter(self.policies.values())).image_size

    def _slot_id(self, slot: str) -> int:
        if slot not in self.slot_ids:
            raise KdcacheError(f"view slot '{slot}' is not among {list(self.slot_ids)}")
        return self.slot_ids[slot]

    def key_prefix(self, round_: int, slot: str, device: torch.device) -> torch.Tensor:
        """The key's hash state before the sample index, as an int64 scalar on `device`."""
        key = (round_, slot, device)
        if key not in self._prefixes:
            self._prefixes[key] = key_prefix(self.store_seed, round_, self._slot_id(slot), device)
            self._normalization(device)  # made here, outside a compiled step (CUDA graphs reuse their outputs)
        return self._prefixes[key]

    def _normalization(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._constants:
            self._constants[device] = (channel_constants(self.mean, device), channel_constants(self.std, device))
        return self._constants[device]

    def seeds(self, round_: int, slot: str, indices: torch.Tensor) -> torch.Tensor:
        return seeds_from_prefix(self.key_prefix(round_, slot, indices.device), indices)

    def __call__(self, round_: int, slot: str, images, indices: torch.Tensor) -> torch.Tensor:
        """uint8 images [B,3,H,W] with their sample indices -> float32 normalised views; or, for
        images of their own sizes, `CropLoader`'s {slot: boxes cut at decode time}."""
        return self.views(slot, self.key_prefix(round_, slot, indices.device), images, indices)

    def views(self, slot: str, prefix: torch.Tensor, images, indices: torch.Tensor) -> torch.Tensor:
        """`__call__` with the round given as its key prefix: the form a compiled step takes,
        so one graph serves every round."""
        seeds = seeds_from_prefix(prefix, indices)
        if isinstance(images, dict):  # the slot's boxes, cut and resized at decode time
            images = images[slot]
            views = self.policies[slot].finish(images, seeds, dense=self.dense)
        else:
            views = self.policies[slot](images, seeds, dense=self.dense)
        return normalize(views, *self._normalization(images.device))


def replayer_for(store) -> ViewReplayer:
    """The replayer of a `LogitStore`: its policies, seed and normalisation, as precompute used them."""
    ident = store.identity
    return ViewReplayer(ident["policies"], ident["store_seed"], ident["mean"], ident["std"])


def check_store(store: LogitStore, meta: DatasetMeta, views: tuple[str, ...]) -> None:
    """The store must come from this data (pixels, labels, normalisation) and hold the views."""
    ident = store.identity
    if ident["dataset_fingerprint"] != meta.fingerprint:
        raise KdcacheError(f"store {store.path} was made from other data (fingerprint {ident['dataset_fingerprint'][:12]} "
                           f"!= {meta.fingerprint[:12]} of {meta.name}); pass the --data it was made from")
    if store.num_classes != meta.num_classes:
        raise KdcacheError(f"store {store.path} has {store.num_classes} classes, the data {meta.num_classes}")
    if list(ident["mean"]) != list(meta.mean) or list(ident["std"]) != list(meta.std):
        raise KdcacheError(f"store {store.path} normalises with other mean/std than {meta.name}'s meta.json")
    missing = [v for v in views if v not in store.views]
    if missing:
        raise KdcacheError(f"store {store.path} has views {store.views}, the loss needs {list(views)}; "
                           f"precompute with --views {','.join(views)}")


@lru_cache(maxsize=None)
def _identity_policy(image_size: int) -> ViewPolicy:
    return get_policy("identity", image_size)


def eval_replayer(image_size: int, mean, std) -> ViewReplayer:
    """The evaluation view of images of their own sizes, cut at decode time by the loader it
    is given to: the centred square of `OWN_SIZE_EVAL_CROP` of the shorter side, resized."""
    spec = get_policy("identity", image_size, crop_fraction=OWN_SIZE_EVAL_CROP).spec()
    return ViewReplayer({EVAL_SLOT: spec}, 0, mean, std)


def view_size(meta: DatasetMeta, requested: int | None = None) -> int:
    """The side of the views of this data: its own for images of one size, else `requested`
    (precompute's --image-size) or OWN_SIZE_IMAGE_SIZE."""
    if not meta.own_size:
        if requested not in (None, meta.image_shape[-1]):
            raise KdcacheError(f"--image-size {requested}: {meta.name}'s images are all {meta.image_shape[-1]} px and "
                               "its views keep that size; drop --image-size")
        return meta.image_shape[-1]
    if requested is not None and not (isinstance(requested, int) and requested > 0):
        raise KdcacheError(f"--image-size must be a positive integer, got {requested!r}")
    return requested or OWN_SIZE_IMAGE_SIZE


def eval_views(images, mean, std) -> torch.Tensor:
    """uint8 [B,3,H,W] -> the float32 un-augmented, normalised views models are evaluated on.

    This is the `identity` view policy followed by the dataset's normalisation
    (`DatasetMeta.mean`, `.std`), what `kdcache distill` reports test accuracy on. For
    images of their own sizes, `images` is the batch of a loader made with `eval_replayer`
    ({EVAL_SLOT: centre boxes cut and resized at decode time}), already the view.
    """
    if isinstance(images, dict):
        images = images[EVAL_SLOT]
    # The identity policy draws nothing from its seeds; any int64 values will do.
    no_seeds = torch.zeros(len(images), dtype=torch.int64, device=images.device)
    return normalize(_identity_policy(images.shape[-1])(images, no_seeds), mean, std)
