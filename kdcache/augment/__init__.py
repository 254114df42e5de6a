"""Seeded, batched, replayable views: a view is named by (store_seed, round, slot, index).

See docs/views.md for the seed and parameter derivation (part of the store format).
"""

from kdcache.augment.policies import (
    POLICY_FORMAT_VERSION,
    ViewPolicy,
    get_policy,
    list_policies,
    normalize,
    policy_from_spec,
)
from kdcache.augment.render import render_grid
from kdcache.augment.seeds import SEED_FORMAT_VERSION, view_seeds

__all__ = [
    "POLICY_FORMAT_VERSION", "SEED_FORMAT_VERSION", "ViewPolicy", "get_policy", "list_policies",
    "normalize", "policy_from_spec", "render_grid", "view_seeds",
]
