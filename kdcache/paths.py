"""Where kdcache keeps things by default: data, stores and runs under KDCACHE_HOME."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kdcache.errors import KdcacheError


def home() -> Path:
    """`$KDCACHE_HOME`, else `~/.cache/kdcache`."""
    path = Path(os.environ.get("KDCACHE_HOME") or Path.home() / ".cache" / "kdcache")
    if path.exists() and not path.is_dir():
        raise KdcacheError(f"KDCACHE_HOME={path} is a file; point it to a directory (or unset it)")
    return path


def default_data_dir(dataset: str) -> Path:
    return home() / "data" / dataset


def stores_root() -> Path:
    return home() / "stores"


def mdistiller_teacher_ckpt(teacher: str) -> Path:
    """The path mdistiller/RepDistiller release teachers under, relative to the working dir."""
    return Path("download_ckpts") / "cifar_teachers" / f"{teacher}_vanilla" / "ckpt_epoch_240.pth"


def content_address(identity: dict[str, Any]) -> str:
    """A short stable hash of a store identity, so equal recipes share one store."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def default_store_path(identity: dict[str, Any]) -> Path:
    return stores_root() / f"{identity['teacher']}-{content_address(identity)}"
