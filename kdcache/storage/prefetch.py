"""Load the next slabs on a background thread while training uses the current ones."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


class SlabPrefetcher:
    """Iterate `(key, load(*key))` over `keys` in order, loading up to `depth` items ahead
    (`load` is e.g. `store.slab`, or what puts a slab's encoded rows on the training device).

    At most depth + 2 items are in memory: the consumer's, `depth` queued, one loading.
    A loading error is raised in the consumer at the slab where it happened. Leaving the
    loop early (break, exception) or calling `close()` stops the thread.
    """

    def __init__(self, load: Callable, keys: list[tuple], depth: int = 1):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._load = load
        self._keys = list(keys)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._load_all, name="kdcache-slab-prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item) -> bool:
        """Queue an item unless asked to stop; False once stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _load_all(self):
        for key in self._keys:
            try:
                item = (key, self._load(*key))
            except BaseException as error:  # handed to the consumer, which re-raises it
                self._put(_Failure(error))
                return
            if not self._put(item):
                return
        self._put(_DONE)

    def __iter__(self):
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            self.close()

    def close(self):
        """Stop the loader thread and wait for it."""
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
