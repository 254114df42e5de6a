"""Reading and writing model weights.

`load_weights` accepts the checkpoint layouts users bring: mdistiller/RepDistiller files
(`{"model": state_dict, "epoch": ..., ...}`), timm training checkpoints
(`{"state_dict": ...}`), plain state dicts (torchvision and timm weight files among them),
safetensors files, kdcache's own checkpoints, and DDP-wrapped weights ("module." prefix).
It checks names and shapes itself first, so a mismatch leaves the model untouched and says
which keys are wrong.
"""

import hashlib
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdcache.errors import KdcacheError, warn_once

CHECKPOINT_FORMAT = "kdcache-checkpoint"
CHECKPOINT_VERSION = 1
_DDP_PREFIX = "module."
_STATE_KEYS = ("model", "state_dict")  # mdistiller/RepDistiller/kdcache, timm/Lightning
_SHOWN_KEYS = 3

# Released mdistiller/RepDistiller teachers pickle numpy scalars (accuracy, epoch). These
# globals only rebuild a number from a dtype and raw bytes, so the safe loader may allow
# them. The scalar function is numpy.core.multiarray.scalar in files pickled under numpy
# 1.x, numpy._core.multiarray.scalar under numpy 2.
_numpy_scalar = np.float64(0).__reduce__()[0]
_NUMPY_SCALAR_GLOBALS = [
    _numpy_scalar,
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    *{type(np.dtype(code)) for code in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]},
]


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


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian), then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise KdcacheError(f"{path} is a safetensors file; reading it needs safetensors: "
                           "pip install 'kdcache[safetensors]'") from None
    try:
        return load_file(path, device="cpu")
    except SafetensorError as e:
        raise KdcacheError(f"cannot read safetensors file {path}: {str(e).splitlines()[0]}") from e


def _torch_load(path: Path, trusted: bool) -> object:
    """torch.load with the safe loader, allowing numpy scalars; a file needing more is
    unpickled in full only when `trusted`, with a warning."""
    try:
        with torch.serialization.safe_globals(_NUMPY_SCALAR_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not found:
            raise
        if not trusted:
            raise KdcacheError(
                f"checkpoint {path} holds Python objects besides tensors ({found.group(1)}); loading it can "
                "run code stored in it: if you trust the file, pass --trust-checkpoint (trusted=True in Python)"
            ) from None
        warn_once(f"unpickling {path} in full (it holds {found.group(1)}): this runs any code stored in it")
        return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint(path: str | os.PathLike, *, trusted: bool = False) -> dict:
    """Load a checkpoint file (PyTorch or safetensors) to a dict on the CPU.

    PyTorch files load with `weights_only=True`, which cannot run code hidden in the file,
    with numpy scalars allowed. Files that pickle other Python objects (an argparse
    Namespace, a model class) need `trusted=True`, which unpickles them fully: only for
    files from a trusted source.
    """
    path = Path(path)
    if not path.is_file():
        raise KdcacheError(f"checkpoint not found: {path}")
    try:
        obj = _read_safetensors(path) if _is_safetensors(path) else _torch_load(path, trusted)
    except pickle.UnpicklingError as e:
        raise KdcacheError(f"cannot read checkpoint {path}: not a PyTorch file, or corrupt") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KdcacheError(f"cannot read checkpoint {path}: {reason}") from e
    if not isinstance(obj, dict):
        raise KdcacheError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def _state_dict_of(checkpoint: dict, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside a loaded checkpoint and drop a DDP "module." prefix."""
    nested = [checkpoint[k] for k in _STATE_KEYS if isinstance(checkpoint.get(k), Mapping)]
    state = nested[0] if nested else checkpoint
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KdcacheError(
            f"checkpoint {path} holds no state dict (expected tensors, or a dict under 'model' or 'state_dict')"
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
