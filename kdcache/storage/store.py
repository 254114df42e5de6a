"""The logit store: a zarr v3 group with one slab of teacher logits per (round, view).

Layout and attributes are documented in docs/store-format.md. The rule readers rely on:
a slab exists only once its own group `slabs/rNNNNN/VIEW` has the attribute
`complete: true`, which its one writer sets after all of its arrays are written. Each
marker lives in its own small file, so writers completing different slabs never race
on a shared attribute.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from kdcache import __version__
from kdcache.errors import KdcacheError
from kdcache.storage.encodings import get_encoding, logit_errors, measure_encoding

STORE_FORMAT_VERSION = 1
FORMAT_KEY = "kdcache_store_format"
SEED_BYTES = 8
# Target size of one chunk: a CIFAR-100 float16 slab (10 MB) is 3 chunks.
CHUNK_BYTES = 4 * 2**20
_MISSING = "<absent>"
_NOT_A_GROUP = (
    FileNotFoundError,
    NotADirectoryError,
    zarr.errors.GroupNotFoundError,
    zarr.errors.ContainsArrayError,
)


def slab_path(round: int, view: str) -> str:
    """Group path of one slab inside the store."""
    return f"slabs/r{round:05d}/{view}"


def _read_root_attrs(path: Path) -> dict | None:
    """The root attributes if `path` holds a kdcache store, else None."""
    try:
        root = zarr.open_group(path, mode="r", zarr_format=3)
    except _NOT_A_GROUP:
        return None
    attrs = dict(root.attrs)
    return attrs if FORMAT_KEY in attrs else None


def _as_json(value, what: str):
    """JSON-normal form (tuples -> lists), so stored and given values compare equal."""
    try:
        return json.loads(json.dumps(value))
    except TypeError as exc:
        raise KdcacheError(f"{what} must be JSON-serialisable: {exc}") from None


def _first_difference(stored, given, name: str):
    """(dotted field name, stored value, given value) of the first mismatch, or None."""
    if isinstance(stored, dict) and isinstance(given, dict):
        for key in list(given) + [k for k in stored if k not in given]:
            field = f"{name}.{key}" if name else key
            diff = _first_difference(stored.get(key, _MISSING), given.get(key, _MISSING), field)
            if diff:
                return diff
        return None
    return None if stored == given else (name, stored, given)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _to_numpy_logits(logits) -> np.ndarray:
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(logits, dtype=np.float32)


def _to_numpy_seeds(seeds) -> np.ndarray:
    """uint64 seeds; int64 input is taken as uint64 bit patterns (torch has no uint64)."""
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.detach().cpu().numpy()
    seeds = np.ascontiguousarray(seeds)
    if seeds.dtype not in (np.int64, np.uint64):
        raise ValueError(f"seeds must be int64 or uint64, got {seeds.dtype}")
    return seeds.view(np.uint64)


def _size_on_disk(path: Path) -> int:
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(path)
        for name in names
    )


class LogitStore:
    """Teacher logits for `rounds` x `views` slabs of `num_samples` x `num_classes`."""

    def __init__(self, path: Path, root: zarr.Group, writable: bool):
        attrs = dict(root.attrs)
        self._path = path
        self._root = root
        self._writable = writable
        self._attrs = attrs
        self._encoding = get_encoding(attrs["identity"]["encoding"])
        # Markers never go back to incomplete, so a complete slab need not be re-read.
        self._complete: set[tuple[int, str]] = set()

    # ---- creating and opening -------------------------------------------------------

    @classmethod
    def create(
        cls,
        path,
        *,
        identity: dict,
        num_samples: int,
        num_classes: int,
        rounds: int,
        views: list[str],
        encoding: str = "float16",
        attrs: dict | None = None,
        overwrite: bool = False,
    ) -> LogitStore:
        """Create a store, or open the existing one at `path` to resume it.

        Resuming needs the same identity, sample count, class count, views and encoding;
        `rounds` and `attrs` may change (they are updated). Call it from one process and
        let the others `open` the store afterwards.
        """
        path = Path(path)
        enc = get_encoding(encoding)
        identity = _as_json(identity, "identity")
        if identity.get("encoding", enc.name) != enc.name:
            raise ValueError(f"identity encoding {identity['encoding']!r} != encoding {enc.name!r}")
        identity["encoding"] = enc.name
        views = list(views)
        if not views or len(set(views)) != len(views) or any(
            not v or "/" in v or v.startswith(".") for v in views
        ):
            raise KdcacheError(f"views must be distinct non-empty names without '/', got {views}")
        if num_samples < 1 or num_classes < 2 or rounds < 1:
            raise KdcacheError(
                f"a store needs num_samples >= 1, num_classes >= 2, rounds >= 1; "
                f"got {num_samples}, {num_classes}, {rounds}"
            )
        attrs = _as_json(attrs or {}, "attrs")

        existing = _read_root_attrs(path)
        if overwrite and path.exists():
            if existing is None and (not path.is_dir() or any(path.iterdir())):
                raise KdcacheError(f"refusing to overwrite {path}: it is not a kdcache store")
            shutil.rmtree(path)
        elif existing is not None:
            store = cls.open(path, mode="r+")
            store._check_same(identity, num_samples, num_classes, views)
            store._update_root(rounds=rounds, attrs={**store.attrs, **attrs})
            return store
        elif path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise KdcacheError(f"{path} exists and is not a kdcache store; choose another path")

        root_attrs = {
            FORMAT_KEY: STORE_FORMAT_VERSION,
            "kdcache_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "identity": identity,
            "num_samples": num_samples,
            "num_classes": num_classes,
            "rounds": rounds,
            "views": views,
            "attrs": attrs,
        }
        root = zarr.open_group(path, mode="w", zarr_format=3, attributes=root_attrs)
        return cls(path, root, writable=True)

    @classmethod
    def open(cls, path, mode: str = "r") -> LogitStore:
        """Open an existing store, read-only (`r`) or for writing slabs (`r+`)."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        path = Path(path)
        if not path.exists():
            raise KdcacheError(f"no logit store at {path}; check the path or run precompute first")
        attrs = _read_root_attrs(path)
        if attrs is None:
            raise KdcacheError(f"{path} is not a kdcache logit store; check the path")
        version = attrs[FORMAT_KEY]
        if version > STORE_FORMAT_VERSION:
            raise KdcacheError(
                f"{path} has store format {version}, newer than this kdcache "
                f"({__version__}) reads ({STORE_FORMAT_VERSION}); upgrade kdcache"
            )
        return cls(path, zarr.open_group(path, mode=mode, zarr_format=3), writable=mode == "r+")

    def _check_same(self, identity, num_samples, num_classes, views):
        stored = {
            **self._attrs["identity"],
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "views": self.views,
        }
        given = {**identity, "num_samples": num_samples, "num_classes": num_classes, "views": views}
        diff = _first_difference(stored, given, "")
        if diff:
            name, old, new = diff
            raise KdcacheError(
                f"{self._path} was made with {name}={_short(old)}, "
                f"this run has {name}={_short(new)}; "
                "pass --overwrite to replace it or choose another path"
            )

    def _update_root(self, **changes):
        if any(self._attrs[key] != value for key, value in changes.items()):
            self._root.update_attributes(changes)
            self._attrs.update(changes)

    # ---- properties -----------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def identity(self) -> dict:
        return json.loads(json.dumps(self._attrs["identity"]))

    @property
    def num_samples(self) -> int:
        return self._attrs["num_samples"]

    @property
    def num_classes(self) -> int:
        return self._attrs["num_classes"]

    @property
    def rounds(self) -> int:
        return self._attrs["rounds"]

    @property
    def views(self) -> list[str]:
        return list(self._attrs["views"])

    @property
    def encoding(self) -> str:
        return self._encoding.name

    @property
    def attrs(self) -> dict:
        """Free-form attributes given at creation (teacher test accuracy, ...)."""
        return json.loads(json.dumps(self._attrs["attrs"]))

    # ---- slabs ----------------------------------------------------------------------

    def _check_key(self, round: int, view: str):
        if not 0 <= round < self.rounds:
            raise KdcacheError(
                f"round {round} is out of range: the store has rounds 0..{self.rounds - 1}"
            )
        if view not in self._attrs["views"]:
            raise KdcacheError(f"view {view!r} is not in the store; its views are {self.views}")

    def write_slab(self, round: int, view: str, logits, seeds, stats: dict | None = None):
        """Write one slab's data, then its completion marker (the slab's only writer)."""
        if not self._writable:
            raise KdcacheError(f"{self._path} was opened read-only; open it with mode='r+'")
        self._check_key(round, view)
        if self.is_complete(round, view):
            raise ValueError(f"slab {slab_path(round, view)} is already complete")
        logits = _to_numpy_logits(logits)
        seeds = _to_numpy_seeds(seeds)
        shape = (self.num_samples, self.num_classes)
        if logits.shape != shape or seeds.shape != shape[:1]:
            raise ValueError(
                f"slab needs logits {shape} and seeds ({shape[0]},), "
                f"got {logits.shape} and {seeds.shape}"
            )
        if not np.isfinite(logits).all():
            raise KdcacheError(
                f"teacher logits for {slab_path(round, view)} contain NaN or inf; check the teacher"
            )
        stats = _as_json(stats or {}, "stats")
        arrays = {**self._encoding.encode(logits), "seeds": seeds}

        rows = max(1, CHUNK_BYTES // (self._encoding.bytes_per_row(self.num_classes) + SEED_BYTES))
        rows = math.ceil(self.num_samples / math.ceil(self.num_samples / rows))
        # overwrite=True clears what an interrupted earlier attempt left behind.
        group = self._root.create_group(
            slab_path(round, view), overwrite=True, attributes={"complete": False}
        )
        for name, data in arrays.items():
            group.create_array(
                name, data=data, chunks=(rows,) + data.shape[1:], compressors=ZstdCodec(level=3)
            )
        group.update_attributes({"complete": True, "stats": stats})
        self._complete.add((round, view))

    def is_complete(self, round: int, view: str) -> bool:
        """True once the slab's marker says so; only then may its data be read."""
        self._check_key(round, view)
        if (round, view) not in self._complete:
            group = self._root.get(slab_path(round, view))
            if group is None or group.attrs.get("complete") is not True:
                return False
            self._complete.add((round, view))
        return True

    def _keys(self) -> list[tuple[int, str]]:
        return [(r, v) for r in range(self.rounds) for v in self.views]

    def complete_slabs(self) -> list[tuple[int, str]]:
        return [key for key in self._keys() if self.is_complete(*key)]

    def missing_slabs(self) -> list[tuple[int, str]]:
        return [key for key in self._keys() if not self.is_complete(*key)]

    def _complete_group(self, round: int, view: str) -> zarr.Group:
        if not self.is_complete(round, view):
            raise KdcacheError(
                f"slab (round {round}, view {view!r}) of {self._path} is not complete; "
                "run precompute to finish the store"
            )
        return self._root[slab_path(round, view)]

    def slab(self, round: int, view: str) -> torch.Tensor:
        """The whole slab's decoded logits, float32 [N, C], in memory."""
        group = self._complete_group(round, view)
        arrays = {name: array[...] for name, array in group.arrays() if name != "seeds"}
        return torch.from_numpy(self._encoding.decode(arrays, self.num_classes))

    def seeds(self, round: int, view: str) -> torch.Tensor:
        """The slab's view seeds as int64 holding the uint64 bit patterns."""
        seeds = self._complete_group(round, view)["seeds"][...]
        return torch.from_numpy(seeds.view(np.int64))

    def slab_stats(self, round: int, view: str) -> dict:
        return dict(self._complete_group(round, view).attrs["stats"])

    # ---- reporting ------------------------------------------------------------------

    def bytes_per_view_sample(self) -> int:
        """Exact uncompressed bytes per (view, sample): encoded logits plus the 8-byte seed."""
        return self._encoding.bytes_per_row(self.num_classes) + SEED_BYTES

    def info(self) -> dict:
        complete = self.complete_slabs()
        return {
            "path": str(self._path),
            "format_version": self._attrs[FORMAT_KEY],
            "kdcache_version": self._attrs["kdcache_version"],
            "created": self._attrs["created"],
            "identity": self.identity,
            "encoding": self.encoding,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "rounds": self.rounds,
            "views": self.views,
            "attrs": self.attrs,
            "complete_slabs": len(complete),
            "incomplete_slabs": self.rounds * len(self.views) - len(complete),
            "size_on_disk_bytes": _size_on_disk(self._path),
            "bytes_per_view_sample": self.bytes_per_view_sample(),
            "slab_stats": [
                {"round": r, "view": v, **self.slab_stats(r, v)} for r, v in complete
            ],
        }

    def reconstruction_error(self, round: int, view: str, reference_logits) -> dict[str, float]:
        """Errors of the stored slab against the float32 logits it was made from."""
        return logit_errors(reference_logits, self.slab(round, view))

    def measure_encoding(self, round: int, view: str, encoding: str, reference_logits=None) -> dict:
        """Errors another encoding would have on this slab, by re-encoding its float32
        source when given, else the decoded stored slab (then relative to the store)."""
        source = self.slab(round, view) if reference_logits is None else reference_logits
        return measure_encoding(source, encoding)
