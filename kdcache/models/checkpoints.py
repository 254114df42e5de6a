"""Reading and writing model weights.

`load_weights` accepts the checkpoint layouts users bring: mdistiller/RepDistiller files
(`{"model": state_dict, "epoch": ..., ...}`), plain state dicts (torchvision weight files
among them), kdcache's own checkpoints, and DDP-wrapped weights ("module." prefix). It
checks names and shapes itself first, so a mismatch leaves the model untouched and says
which keys are wrong.
"""

import hashlib
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from kdcache.errors import KdcacheError

CHECKPOINT_FORMAT = "kdcache-checkpoint"
CHECKPOINT_VERSION = 1
_DDP_PREFIX = "module."
_SHOWN_KEYS = 3


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes (identifies a teacher checkpoint in a store)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as e:
        raise KdcacheError(f"cannot read {path}: {e.strerror}") from e
    return digest.hexdigest()


def read_checkpoint(path: str | os.PathLike, *, trusted: bool = False) -> dict:
    """Load a checkpoint file to a dict on the CPU.

    Loads with `weights_only=True`, which cannot run code hidden in the file. Files that
    also pickle other Python objects (an argparse Namespace, numpy scalars) need
    `trusted=True`, which unpickles them fully: only for files from a trusted source.
    """
    path = Path(path)
    if not path.is_file():
        raise KdcacheError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # weights_only refused a class or function
            raise KdcacheError(
                f"checkpoint {path} holds Python objects besides tensors; if you trust "
                "the file, load it with trusted=True"
            ) from e
        raise KdcacheError(f"cannot read checkpoint {path}: not a PyTorch file, or corrupt") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KdcacheError(f"cannot read checkpoint {path}: {reason}") from e
    if not isinstance(obj, dict):
        raise KdcacheError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def _state_dict_of(checkpoint: dict, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside a loaded checkpoint and drop a DDP "module." prefix."""
    state = checkpoint["model"] if isinstance(checkpoint.get("model"), Mapping) else checkpoint
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KdcacheError(
            f"checkpoint {path} holds no state dict (expected tensors, or a dict under 'model')"
        )
    if all(k.startswith(_DDP_PREFIX) for k in state):
        state = {k[len(_DDP_PREFIX):]: v for k, v in state.items()}
    return dict(state)


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def _mismatches(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and wrongly shaped keys, each kind as one phrase."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_listed(shapes)}")
    return problems


def load_weights(model: nn.Module, path: str | os.PathLike, *, trusted: bool = False) -> dict:
    """Load weights from `path` into `model` strictly; returns the whole checkpoint dict.

    Raises KdcacheError naming the first offending keys when names or shapes differ
    (wrong architecture or number of classes); the model is then left unchanged.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, trusted=trusted)
    state = _state_dict_of(checkpoint, path)
    problems = _mismatches(model, state)
    if problems:
        raise KdcacheError(
            f"checkpoint {path} does not fit {type(model).__name__}: {'; '.join(problems)}"
        )
    model.load_state_dict(state, strict=True)
    return checkpoint


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **info) -> None:
    """Write a kdcache checkpoint: {"format", "version", "model": state dict, **info}.

    `info` holds what a later run needs to use the weights (model_name, num_classes,
    dataset_fingerprint, mean, std, epoch...), as plain Python values so the file loads
    with weights_only=True. Written to a temporary file renamed over `path`, so a crash
    never leaves a truncated checkpoint.
    """
    reserved = {"format", "version"} & info.keys()
    if reserved:
        raise ValueError(f"save_checkpoint: {sorted(reserved)} are reserved keys")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": state, **info}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
