"""The one function both stages call: (round, slot, sample indices) -> normalised views.

Stage 1 (precompute) and stage 2 (distill, online or cached) build a `ViewReplayer` from
the same store identity, so a sample's view in round r, slot v is the same pixels in
both, whatever the batch it arrives in.
"""

from __future__ import annotations

from typing import Any

import torch

from kdcache.augment import get_policy, normalize, policy_from_spec, view_seeds
from kdcache.errors import KdcacheError

DEFAULT_VIEWS = {"weak": "weak", "strong": "strong"}


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
    key is its position in `slots`, the order the store records.
    """

    def __init__(self, slots: dict[str, dict[str, Any]], store_seed: int, mean, std):
        self.slot_specs = dict(slots)
        self.slot_ids = {slot: i for i, slot in enumerate(slots)}
        self.store_seed = int(store_seed)
        self.policies = {slot: policy_from_spec(spec) for slot, spec in slots.items()}
        self.mean = tuple(mean)
        self.std = tuple(std)

    @classmethod
    def from_policy_names(cls, views: dict[str, str], store_seed: int, image_size: int, mean, std) -> "ViewReplayer":
        specs = {slot: get_policy(policy, image_size).spec() for slot, policy in views.items()}
        return cls(specs, store_seed, mean, std)

    def seeds(self, round_: int, slot: str, indices: torch.Tensor) -> torch.Tensor:
        return view_seeds(self.store_seed, round_, self.slot_ids[slot], indices)

    def __call__(self, round_: int, slot: str, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """uint8 images [B,3,H,W] with their sample indices -> float32 normalised views."""
        if slot not in self.slot_ids:
            raise KdcacheError(f"view slot '{slot}' is not among {list(self.slot_ids)}")
        views = self.policies[slot](images, self.seeds(round_, slot, indices))
        return normalize(views, self.mean, self.std)


def replayer_for(store) -> ViewReplayer:
    """The replayer of a `LogitStore`: its policies, seed and normalisation, as precompute used them."""
    ident = store.identity
    return ViewReplayer(ident["policies"], ident["store_seed"], ident["mean"], ident["std"])
