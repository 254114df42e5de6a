"""Advisory file locks, so two kdcache processes never write the same run dir or slab.

`flock` locks belong to an open file and vanish when the process dies (kill -9
included), so a crashed run never leaves a stale lock that blocks its `--resume`.
The lock file itself stays; it holds nothing but the locking process's pid, for the
error message.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdcache.errors import KdcacheError


class FileLock:
    """An exclusive lock on `path` (created if needed), taken at once or waited for."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock; False (and nothing held) when another process holds it."""
        return self._lock(fcntl.LOCK_EX | fcntl.LOCK_NB)

    def acquire(self) -> None:
        """Wait until the lock is free, then take it (Ctrl-C interrupts the wait)."""
        self._lock(fcntl.LOCK_EX)

    def _lock(self, flags: int) -> bool:
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise KdcacheError(f"cannot create lock file {self.path} ({err.strerror}); check the directory is writable") from None
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:  # e.g. Ctrl-C while waiting
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        """The pid recorded by the process holding the lock, or '?'."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextmanager
def exclusive(path: str | os.PathLike, what: str) -> Iterator[FileLock]:
    """Hold the lock on `path` for the block, or fail at once with a one-line error naming `what`."""
    lock = FileLock(path)
    if not lock.try_acquire():
        raise KdcacheError(f"{what} is in use by another kdcache process (pid {lock.holder()}); "
                           "wait for it to finish or choose another path")
    try:
        yield lock
    finally:
        lock.release()
