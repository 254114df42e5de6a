"""Distillation losses behind one interface (docs/losses.md).

`get_loss(name, **overrides)` builds a `DistillLoss`; `list_losses()` names them.
"""

from kdcache.errors import KdcacheError
from kdcache.losses.base import DistillLoss
from kdcache.losses.classic import DIST, DKD, KD, CrossEntropy
from kdcache.losses.cmkd import CMKD
from kdcache.losses.crld import CRLD

_LOSSES: dict[str, type[DistillLoss]] = {
    cls.name: cls for cls in (CrossEntropy, KD, DKD, DIST, CRLD, CMKD)
}


def list_losses() -> list[str]:
    """Names accepted by `get_loss`."""
    return list(_LOSSES)


def get_loss(name: str, **overrides) -> DistillLoss:
    """The loss `name` with its defaults, updated by `overrides` (hyperparameter names)."""
    if name not in _LOSSES:
        raise KdcacheError(f"unknown loss '{name}'; choose one of: {', '.join(_LOSSES)}")
    return _LOSSES[name](**overrides)


__all__ = ["DistillLoss", "get_loss", "list_losses"]
