"""The logit store: a zarr v3 group with one slab of teacher logits per (round, view).

Layout and attributes are documented in docs/store-format.md. The rule readers rely on:
a slab exists only once its own group `slabs/rNNNNN/VIEW` has the attribute
`complete: true`, which its one writer sets after all of its arrays are written. Each
marker lives in its own small file, so writers completing different slabs never race
on a shared attribute. The marker also lists the slab's chunk files and their sizes, and
every chunk carries a crc32c, so a deleted, truncated or garbled chunk is reported as a
damaged slab instead of being read as zeros.
"""

from __future__ import annotations

import datetime
import errno
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from kdcache import __version__
from kdcache.errors import KdcacheError, first_difference, short_json
from kdcache.locks import FileLock
from kdcache.storage.encodings import (SAMPLE, LogitErrors, TopKEncoding, as_torch, block_rows, get_encoding,
                                       logit_errors, measure_encoding)
from kdcache.storage.rows import EncodedRows, lookup_table

# 3: top-k values in float16 (were float32).
# 2: crc32c on every chunk, every chunk written, chunk files listed in the marker.
STORE_FORMAT_VERSION = 3
# Format 2 differs from 3 only in the dtype of top-k values, which decoding casts anyway.
OLDEST_READABLE_FORMAT = 2
FORMAT_KEY = "kdcache_store_format"
SEED_BYTES = 8
# Target size of one chunk: a CIFAR-100 float16 slab (10 MB) is 3 chunks.
CHUNK_BYTES = 4 * 2**20
# Slab paths have five round digits; one round per student epoch needs far fewer.
MAX_ROUNDS = 100_000
MAX_VIEWS = 64
_VIEW_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
LOCKS_DIR = "locks"
_NOT_A_GROUP = (
    FileNotFoundError,
    NotADirectoryError,
    zarr.errors.GroupNotFoundError,
    zarr.errors.ContainsArrayError,
)
# What reading a damaged file raises: checksum and JSON errors are ValueErrors, a
# missing file an OSError or KeyError, metadata of the wrong shape a TypeError.
_READ_ERRORS = (ValueError, TypeError, KeyError, OSError)


def slab_path(round: int, view: str) -> str:
    """Group path of one slab inside the store."""
    return f"slabs/r{round:05d}/{view}"


def _one_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_root_attrs(path: Path) -> dict | None:
    """The root attributes if `path` holds a kdcache store, else None."""
    try:
        root = zarr.open_group(path, mode="r", zarr_format=3)
    except _NOT_A_GROUP:
        return None
    except _READ_ERRORS as err:
        raise KdcacheError(
            f"{path / 'zarr.json'} is unreadable ({_one_line(err)}); if {path} is a logit store it is "
            "damaged: delete it and rerun precompute"
        ) from None
    attrs = dict(root.attrs)
    return attrs if FORMAT_KEY in attrs else None


# Root attributes a reader relies on, with their types.
_ROOT_TYPES = {FORMAT_KEY: int, "kdcache_version": str, "created": str, "identity": dict, "num_samples": int,
               "num_classes": int, "rounds": int, "views": list, "attrs": dict}


def _check_root_attrs(path: Path, attrs: dict) -> None:
    """Refuse stores of another format version, or whose root attributes are damaged."""
    version = attrs.get(FORMAT_KEY)
    if isinstance(version, int) and not OLDEST_READABLE_FORMAT <= version <= STORE_FORMAT_VERSION:
        if version > STORE_FORMAT_VERSION:
            raise KdcacheError(
                f"{path} has store format {version}, newer than this kdcache "
                f"({__version__}) reads ({STORE_FORMAT_VERSION}); upgrade kdcache"
            )
        raise KdcacheError(
            f"{path} has store format {version}, without the chunk checksums this kdcache "
            f"({__version__}) needs; recreate it: rerun precompute with --overwrite"
        )
    for key, kind in _ROOT_TYPES.items():
        if not isinstance(attrs.get(key), kind) or isinstance(attrs.get(key), bool):
            raise KdcacheError(
                f"{path} has a damaged root attribute {key!r} ({short_json(attrs.get(key))}); "
                "recreate the store: rerun precompute with --overwrite"
            )
    try:
        _check_layout(attrs["num_samples"], attrs["num_classes"], attrs["rounds"], attrs["views"])
        get_encoding(attrs["identity"].get("encoding")).check(attrs["num_classes"])
    except KdcacheError as err:
        raise KdcacheError(f"{path} has damaged root attributes ({err}); "
                           "recreate the store: rerun precompute with --overwrite") from None


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A full disk or a read-only folder is one line saying so, not a traceback."""
    try:
        yield
    except OSError as err:
        raise KdcacheError(f"cannot write to {path} ({err.strerror or err}); free space or fix its "
                           "permissions, then rerun precompute (it resumes)") from None


def _check_layout(num_samples, num_classes, rounds, views) -> None:
    """Sizes a store can mean; view names become directory names: short, plain, distinct."""
    if not all(isinstance(v, str) and _VIEW_NAME.fullmatch(v) for v in views) or not 1 <= len(views) <= MAX_VIEWS \
            or len(set(views)) != len(views):
        raise KdcacheError(
            f"views must be 1 to {MAX_VIEWS} distinct names of letters, digits, '_' or '-' "
            f"(at most 64 characters), got {short_json(views)}"
        )
    if num_samples < 1 or num_classes < 2 or not 1 <= rounds <= MAX_ROUNDS:
        raise KdcacheError(
            f"a store needs num_samples >= 1, num_classes >= 2, 1 <= rounds <= {MAX_ROUNDS}; "
            f"got {num_samples}, {num_classes}, {rounds}"
        )


def _as_json(value, what: str):
    """JSON-normal form (tuples -> lists), so stored and given values compare equal."""
    try:
        return json.loads(json.dumps(value))
    except TypeError as exc:
        raise KdcacheError(f"{what} must be JSON-serialisable: {exc}") from None


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
    """Bytes of every file under `path`; a writer's temporary file may vanish meanwhile."""
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except FileNotFoundError:
                pass
    return total


def _chunk_files(folder: Path) -> dict[str, int]:
    """Size of every chunk file of a slab, by its path relative to the slab group."""
    return {
        file.relative_to(folder).as_posix(): file.stat().st_size
        for file in sorted(folder.rglob("*"))
        if file.is_file() and file.name != "zarr.json"
    }


def _refuse_if_locked(path: Path) -> None:
    """Refuse to delete a store while another process writes one of its slabs."""
    for file in sorted((path / LOCKS_DIR).glob("*.lock")):
        lock = FileLock(file)
        if not lock.try_acquire():
            raise KdcacheError(
                f"refusing to overwrite {path}: another kdcache process (pid {lock.holder()}) is "
                "writing it; wait for it to finish"
            )
        lock.release()


class LogitStore:
    """Teacher logits for `rounds` x `views` slabs of `num_samples` x `num_classes`."""

    def __init__(self, path: Path, root: zarr.Group, writable: bool):
        attrs = dict(root.attrs)
        _check_root_attrs(path, attrs)
        self._path = path
        self._root = root
        self._writable = writable
        self._attrs = attrs
        self._encoding = get_encoding(attrs["identity"]["encoding"])
        if writable and attrs[FORMAT_KEY] < STORE_FORMAT_VERSION and isinstance(self._encoding, TopKEncoding):
            raise KdcacheError(
                f"{path} has store format {attrs[FORMAT_KEY]}, whose top-k values are float32; this kdcache "
                f"reads it but writes format {STORE_FORMAT_VERSION} (float16): to add slabs, recompute it with "
                "precompute --overwrite"
            )

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

        Everything is checked before anything is written. Resuming needs the same
        identity, sample count, class count, views and encoding; `attrs` are updated and
        `rounds` only grows (a store never forgets rounds it declared). Call it from one
        process and let the others `open` the store afterwards.
        """
        path = Path(path)
        enc = get_encoding(encoding)
        identity = _as_json(identity, "identity")
        if identity.get("encoding", enc.name) != enc.name:
            raise ValueError(f"identity encoding {identity['encoding']!r} != encoding {enc.name!r}")
        identity["encoding"] = enc.name
        views = list(views)
        _check_layout(num_samples, num_classes, rounds, views)
        enc.check(num_classes)
        attrs = _as_json(attrs or {}, "attrs")

        existing = _read_root_attrs(path)
        if overwrite and path.exists():
            if existing is None and (not path.is_dir() or any(path.iterdir())):
                raise KdcacheError(f"refusing to overwrite {path}: it is not a kdcache store")
            _refuse_if_locked(path)
            with _writing(path):
                shutil.rmtree(path)
        elif existing is not None:
            store = cls.open(path, mode="r+")
            store._check_same(identity, num_samples, num_classes, views)
            store._update_root(rounds=max(rounds, store.rounds), attrs={**store.attrs, **attrs})
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
        # Made aside and renamed into place, so a concurrent precompute never sees a half-made store.
        staging = path.parent / f".{path.name}.creating-{os.getpid()}"
        with _writing(path):
            shutil.rmtree(staging, ignore_errors=True)
            zarr.open_group(staging, mode="w-", zarr_format=3, attributes=root_attrs)
            try:
                os.rename(staging, path)
            except OSError as err:
                shutil.rmtree(staging, ignore_errors=True)
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # another process created it meanwhile: resume it
                return cls.create(path, identity=identity, num_samples=num_samples, num_classes=num_classes,
                                  rounds=rounds, views=views, encoding=encoding, attrs=attrs)
        return cls(path, zarr.open_group(path, mode="r+"), writable=True)

    @classmethod
    def open(cls, path, mode: str = "r") -> LogitStore:
        """Open an existing store, read-only (`r`) or for writing slabs (`r+`)."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        path = Path(path)
        if not path.exists():
            raise KdcacheError(f"no logit store at {path}; check the path or run precompute first")
        if _read_root_attrs(path) is None:
            raise KdcacheError(f"{path} is not a kdcache logit store; check the path")
        return cls(path, zarr.open_group(path, mode=mode, zarr_format=3), writable=mode == "r+")

    def _check_same(self, identity, num_samples, num_classes, views):
        stored = {
            **self._attrs["identity"],
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "views": self.views,
        }
        given = {**identity, "num_samples": num_samples, "num_classes": num_classes, "views": views}
        diff = first_difference(stored, given)
        if diff:
            name, old, new = diff
            raise KdcacheError(
                f"{self._path} was made with {name}={short_json(old)}, "
                f"this run has {name}={short_json(new)}; "
                "pass --overwrite to replace it or choose another path"
            )

    def _update_root(self, **changes):
        if any(self._attrs[key] != value for key, value in changes.items()):
            with _writing(self._path):
                self._root.update_attributes(changes)
            self._attrs.update(changes)

    def update_attrs(self, attrs: dict) -> None:
        """Add or change free-form attributes (e.g. the teacher's test accuracy)."""
        self._update_root(attrs={**self.attrs, **_as_json(attrs, "attrs")})

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

    def slab_lock(self, round: int, view: str) -> FileLock:
        """The lock a writer holds while it computes and writes this slab (not yet taken)."""
        self._check_key(round, view)
        folder = self._path / LOCKS_DIR
        with _writing(self._path):
            folder.mkdir(exist_ok=True)
        return FileLock(folder / f"r{round:05d}-{view}.lock")

    def chunk_rows(self) -> int:
        """Rows per chunk of every array of a slab: as few chunks as keep each near
        CHUNK_BYTES of encoded rows and seeds, with balanced row counts."""
        rows = max(1, CHUNK_BYTES // (self._encoding.bytes_per_row(self.num_classes) + SEED_BYTES))
        return math.ceil(self.num_samples / math.ceil(self.num_samples / rows))

    def slab_writer(self, round: int, view: str, measure: bool = False) -> SlabWriter:
        """Start (re)writing one slab, a block of rows at a time (its only writer); see `SlabWriter`.

        A slab that is damaged or was interrupted is replaced; a complete one is refused.
        """
        if not self._writable:
            raise KdcacheError(f"{self._path} was opened read-only; open it with mode='r+'")
        self._check_key(round, view)
        if self.is_complete(round, view, deep=True):
            raise ValueError(f"slab {slab_path(round, view)} is already complete")
        return SlabWriter(self, round, view, measure)

    def write_slab(self, round: int, view: str, logits, seeds, stats: dict | None = None):
        """Write one whole slab's data, then its completion marker (the slab's only writer)."""
        logits = _to_numpy_logits(logits)
        seeds = _to_numpy_seeds(seeds)
        shape = (self.num_samples, self.num_classes)
        if logits.shape != shape or seeds.shape != shape[:1]:
            raise ValueError(
                f"slab needs logits {shape} and seeds ({shape[0]},), "
                f"got {logits.shape} and {seeds.shape}"
            )
        stats = _as_json(stats or {}, "stats")
        writer = self.slab_writer(round, view)
        step = writer.chunk_rows
        for start in range(0, self.num_samples, step):
            writer.append(logits[start:start + step], seeds[start:start + step])
        writer.finish(stats)

    def _state(self, round: int, view: str, deep: bool = False) -> tuple[str, str]:
        """("complete", ""), ("missing", "") for a slab not written or interrupted, or
        ("damaged", why) for one marked complete whose files are not as written.

        The quick check compares the chunk files with the sizes the marker lists (a few
        stat calls); `deep` also reads every chunk, which verifies its crc32c.
        """
        self._check_key(round, view)
        try:
            group = self._root.get(slab_path(round, view))
            if group is None or group.attrs.get("complete") is not True:
                return "missing", ""
            chunks = group.attrs.get("chunks")
        except _READ_ERRORS as err:
            return "damaged", f"its zarr.json is unreadable: {_one_line(err)}"
        if not isinstance(chunks, dict) or not chunks:
            return "damaged", "its marker lists no chunk files"
        folder = self._path / slab_path(round, view)
        for name, size in chunks.items():
            try:
                actual = (folder / name).stat().st_size
            except OSError:
                return "damaged", f"chunk file {name} is missing"
            if actual != size:
                return "damaged", f"chunk file {name} has {actual} bytes, {size} were written"
        if deep:
            try:
                self._read(group, (*self._encoding.array_names, "seeds"))
            except _READ_ERRORS as err:
                return "damaged", _one_line(err)
        return "complete", ""

    def _read(self, group: zarr.Group, names, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Named arrays of a slab group, each checked to have one row per sample: all rows, or
        only `rows` (sorted, distinct). Read one chunk at a time, so that beyond the result
        only one decoded chunk is held."""
        arrays = {}
        for name in names:
            array = group[name]
            if array.shape[:1] != (self.num_samples,):
                raise ValueError(f"array {name} has shape {array.shape}, expected {self.num_samples} rows")
            step = array.chunks[0]
            starts = np.arange(0, self.num_samples, step)
            if rows is None:
                out = np.empty(array.shape, array.dtype)
                for start in starts:
                    out[start:start + step] = array[start:start + step]
            else:
                out = np.empty((len(rows), *array.shape[1:]), array.dtype)
                bounds = np.searchsorted(rows, np.append(starts, self.num_samples))
                for start, low, high in zip(starts, bounds[:-1], bounds[1:]):
                    if low < high:
                        out[low:high] = array[start:start + step][rows[low:high] - start]
            arrays[name] = out
        return arrays

    def is_complete(self, round: int, view: str, deep: bool = False) -> bool:
        """True once the slab's marker says so and its files are as written; only then
        may its data be read. `deep` also verifies every chunk's checksum."""
        return self._state(round, view, deep)[0] == "complete"

    def _keys(self) -> list[tuple[int, str]]:
        return [(r, v) for r in range(self.rounds) for v in self.views]

    def complete_slabs(self) -> list[tuple[int, str]]:
        return [key for key in self._keys() if self.is_complete(*key)]

    def missing_slabs(self) -> list[tuple[int, str]]:
        """Slabs precompute still has to write: never written, interrupted or damaged."""
        return [key for key in self._keys() if not self.is_complete(*key)]

    def damaged_slabs(self, deep: bool = False) -> list[tuple[int, str, str]]:
        """(round, view, why) of every slab marked complete whose files are not as written."""
        states = ((*key, *self._state(*key, deep)) for key in self._keys())
        return [(r, v, why) for r, v, state, why in states if state == "damaged"]

    def damaged_error(self, round: int, view: str, why: str) -> KdcacheError:
        """The one-line error for a damaged slab: what is wrong and how to repair it."""
        return KdcacheError(
            f"slab (round {round}, view {view!r}) of {self._path} is damaged ({why}); "
            "rerun precompute on this store to recompute it"
        )

    def _complete_group(self, round: int, view: str) -> zarr.Group:
        state, why = self._state(round, view)
        if state == "damaged":
            raise self.damaged_error(round, view, why)
        if state == "missing":
            raise KdcacheError(
                f"slab (round {round}, view {view!r}) of {self._path} is not complete; "
                "run precompute to finish the store"
            )
        return self._root[slab_path(round, view)]

    def _read_slab(self, round: int, view: str, names, rows=None) -> dict[str, np.ndarray]:
        """Arrays of a complete slab (only `rows` when given); a read failure (e.g. a
        checksum) names the slab."""
        rows = self._check_rows(rows)
        group = self._complete_group(round, view)
        try:
            return self._read(group, names, rows)
        except _READ_ERRORS as err:
            raise self.damaged_error(round, view, _one_line(err)) from None

    def _check_rows(self, rows) -> np.ndarray | None:
        if rows is None:
            return None
        rows = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) or (
                len(rows) and (rows[0] < 0 or rows[-1] >= self.num_samples or (np.diff(rows) <= 0).any())):
            raise KdcacheError(f"rows must be sorted, distinct sample indices in 0..{self.num_samples - 1}; "
                               "sort them and drop repeats (np.unique)")
        return rows.astype(np.int64)

    def slab_rows(self, round: int, view: str, rows=None) -> EncodedRows:
        """The slab's rows still encoded, all of them or only `rows` (sorted, distinct sample
        indices), in memory: what training holds, decoding a batch's rows when it needs them."""
        rows = self._check_rows(rows)
        arrays = self._read_slab(round, view, self._encoding.array_names, rows)
        return EncodedRows(self._encoding, self.num_classes, {k: as_torch(a) for k, a in arrays.items()},
                           None if rows is None else lookup_table(torch.from_numpy(rows), self.num_samples))

    def slab(self, round: int, view: str, rows=None) -> torch.Tensor:
        """The slab's decoded logits, float32 [N, C] (or [len(rows), C] for sorted, distinct
        sample indices `rows`), in memory."""
        arrays = self._read_slab(round, view, self._encoding.array_names, rows)
        return self._encoding.decode(arrays, self.num_classes)

    def seeds(self, round: int, view: str, rows=None) -> torch.Tensor:
        """The slab's view seeds (only `rows` when given) as int64 holding the uint64 bit patterns."""
        return as_torch(self._read_slab(round, view, ("seeds",), rows)["seeds"])

    def slab_stats(self, round: int, view: str) -> dict:
        return dict(self._complete_group(round, view).attrs["stats"])

    # ---- reporting ------------------------------------------------------------------

    def bytes_per_view_sample(self) -> int:
        """Exact uncompressed bytes per (view, sample): encoded logits plus the 8-byte seed."""
        return self._encoding.bytes_per_row(self.num_classes) + SEED_BYTES

    def info(self, deep: bool = False) -> dict:
        """Everything `kdcache info` shows; `deep` verifies every chunk's checksum."""
        states = {key: self._state(*key, deep) for key in self._keys()}
        complete = [key for key, (state, _) in states.items() if state == "complete"]
        damaged = [{"round": r, "view": v, "reason": why} for (r, v), (state, why) in states.items()
                   if state == "damaged"]
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
            "damaged_slabs": damaged,
            "incomplete_slabs": len(states) - len(complete) - len(damaged),
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


class SlabWriter:
    """Writes one slab a block of rows at a time, in sample order, then its marker.

    Made by `LogitStore.slab_writer`, which has already cleared what an interrupted or
    damaged attempt left. `append` encodes and writes the next rows: appending
    `chunk_rows` rows at a time writes each chunk once, so the writer and its caller
    hold one chunk of float32 logits, never the slab. Until `finish` marks it complete the
    slab is ignored by readers and redone by precompute. With `measure`, `errors`
    accumulates the encoding's error on every row written (what precompute records).
    """

    def __init__(self, store: LogitStore, round: int, view: str, measure: bool = False):
        self._store, self._path = store, slab_path(round, view)
        self._encoding = store._encoding
        self.chunk_rows = store.chunk_rows()
        self.rows = 0
        self.errors = LogitErrors() if measure else None
        self._arrays: dict[str, zarr.Array] = {}
        with _writing(store.path):
            # overwrite=True clears what an interrupted or damaged earlier attempt left behind.
            self._group = store._root.create_group(self._path, overwrite=True, attributes={"complete": False})

    def append(self, logits, seeds) -> None:
        """Encode and write the next rows: float32 logits [n, C] and their int64/uint64 seeds [n]."""
        logits, seeds = _to_numpy_logits(logits), _to_numpy_seeds(seeds)
        n, total, num_classes = len(logits), self._store.num_samples, self._store.num_classes
        if logits.shape != (n, num_classes) or seeds.shape != (n,) or self.rows + n > total:
            raise ValueError(f"slab {self._path} has {total} rows of {num_classes} logits, {self.rows} written; "
                             f"got logits {logits.shape} and seeds {seeds.shape}")
        blocks = []
        for start in range(0, n, block_rows(num_classes)):
            block = logits[start:start + block_rows(num_classes)]
            if not np.isfinite(block).all():
                raise KdcacheError(f"teacher logits for {self._path} contain NaN or inf; check the teacher checkpoint")
            blocks.append(self._encoding.encode(block))
            if self.errors is not None:
                self.errors.add(block, self._encoding.decode(blocks[-1], num_classes))
        arrays = {name: np.concatenate([b[name] for b in blocks]) for name in self._encoding.array_names}
        with _writing(self._store.path):
            for name, data in {**arrays, "seeds": seeds}.items():
                self._array(name, data)[self.rows:self.rows + n] = data
        self.rows += n

    def _array(self, name: str, data: np.ndarray) -> zarr.Array:
        """The slab's array `name`, created on the first rows written (their dtype and width)."""
        if name not in self._arrays:
            dimension_names = {**self._encoding.dimension_names, "seeds": (SAMPLE,)}[name]
            # Every chunk is written, even one equal to the fill value, so that a
            # missing chunk file always means damage.
            self._arrays[name] = self._group.create_array(
                name, shape=(self._store.num_samples, *data.shape[1:]), dtype=data.dtype,
                chunks=(self.chunk_rows, *data.shape[1:]), dimension_names=dimension_names,
                compressors=(ZstdCodec(level=3), Crc32cCodec()), config={"write_empty_chunks": True},
            )
        return self._arrays[name]

    def finish(self, stats: dict | None = None) -> None:
        """Mark the slab complete, with `stats` and its chunk files, once every row is written."""
        if self.rows != self._store.num_samples:
            raise ValueError(f"slab {self._path} has {self.rows} of {self._store.num_samples} rows written")
        stats = _as_json(stats or {}, "stats")
        with _writing(self._store.path):
            chunks = _chunk_files(self._store.path / self._path)
            self._group.update_attributes({"complete": True, "stats": stats, "chunks": chunks})
