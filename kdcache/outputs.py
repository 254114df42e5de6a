"""Where kdcache may write, and how: it replaces only what it wrote itself, and never half.

Every command that takes `--out` checks it here before creating anything: a path that
holds something kdcache did not write (a user's file or folder) is refused with one
line, never replaced or deleted. Files are written to a temporary sibling and renamed
into place, so a full disk or a kill leaves the old file (or nothing), not a truncated one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from kdcache.errors import KdcacheError

DATASET_FILES = frozenset({"train.beton", "test.beton", "meta.json"})
RUN_CONFIG = "config.json"
RUN_LOCK = ".lock"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _entries(path: Path) -> set[str]:
    try:
        return {p.name for p in path.iterdir()}
    except OSError as err:
        raise KdcacheError(f"cannot list {path} ({err.strerror}); check the path and its permissions") from None


def _shown(names: Iterable[str], limit: int = 3) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def not_a_file(path: Path, option: str = "--out") -> None:
    """`path` must be a directory or not exist yet."""
    if path.exists() and not path.is_dir():
        raise KdcacheError(f"{option} {path} is a file, not a directory; choose a directory path")


def is_dataset_dir(path: Path) -> bool:
    """True for a folder `kdcache data prepare` wrote: its own files only, and a kdcache meta.json."""
    if not path.is_dir() or not _entries(path) <= DATASET_FILES:
        return False
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "kdcache_version" in meta and "fingerprint" in meta


def check_dataset_out(out: Path, *, overwrite: bool, source: Path | None) -> None:
    """`data prepare --out`: new, or (with --overwrite) a dataset dir kdcache wrote; never the source's folder."""
    not_a_file(out)
    if source is not None:
        src = source.resolve()
        if src == out.resolve() or out.resolve() in src.parents:
            raise KdcacheError(f"--out {out} contains the source {source}; choose an --out outside it")
    if not out.exists():
        return
    if not overwrite:
        raise KdcacheError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    if not is_dataset_dir(out):
        foreign = _entries(out) - DATASET_FILES
        what = f"it holds {_shown(foreign)}" if foreign else "it has no kdcache meta.json"
        raise KdcacheError(f"refusing to replace {out}: it is not a dataset written by `kdcache data prepare` "
                           f"({what}); choose another --out")


def read_run_config(run_dir: Path) -> dict | None:
    """The run's config.json if `run_dir` is a kdcache run dir, else None."""
    try:
        config = json.loads((run_dir / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(config, dict) and {"student", "loss", "recipe"} <= config.keys():
        return config
    return None


def check_run_out(run_dir: Path) -> None:
    """A run's `--out`: new, empty, or a run dir kdcache wrote (so its files may be replaced)."""
    not_a_file(run_dir)
    if run_dir.exists() and _entries(run_dir) - {RUN_LOCK} and read_run_config(run_dir) is None:
        raise KdcacheError(f"refusing to use {run_dir} as a run dir: it holds {_shown(_entries(run_dir))} "
                           "and no kdcache config.json; choose another --out")


def check_report_out(out: Path, report_files: Iterable[str]) -> None:
    """`report --out`: new, or a folder holding only files a report writes."""
    not_a_file(out)
    if out.exists():
        foreign = {name for name in _entries(out) - set(report_files)
                   if not (name.startswith(".") and name.endswith(".tmp"))}  # a killed write's leftovers
        if foreign:
            raise KdcacheError(f"refusing to write a report into {out}: it holds {_shown(foreign)}, which "
                               "`kdcache report` did not write; choose another --out")


def check_png_out(out: Path) -> None:
    """A PNG `--out` may replace only a PNG."""
    if out.is_dir():
        raise KdcacheError(f"--out {out} is a directory; give a file name such as views.png")
    if out.exists():
        with open(out, "rb") as f:
            if f.read(len(PNG_MAGIC)) != PNG_MAGIC:
                raise KdcacheError(f"refusing to replace {out}: it is not a PNG image; choose another --out")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a temporary sibling of `path`, then rename it over `path`.

    Any OSError (full disk, read-only folder) becomes a one-line error, and the temporary
    file is removed: the old `path` stays as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise KdcacheError(f"cannot write {path} ({err.strerror}); check the folder is writable") from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise KdcacheError(f"cannot write {path} ({err.strerror or err}); check free space and permissions") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def remove_stale_temporaries(folder: Path, pattern: str) -> list[Path]:
    """Delete leftovers of a killed write (`.NAME.*.tmp`) in `folder`; the caller holds the lock."""
    removed = []
    for leftover in folder.glob(pattern) if folder.is_dir() else []:
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed
