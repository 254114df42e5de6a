"""User-facing errors.

A `KdcacheError` is something the user can fix (bad path, mismatched store, unknown
name). The CLI prints its message on one line and exits with status 1, no traceback;
the message should say what is wrong and how to fix it.
"""

import json
import sys


class KdcacheError(Exception):
    """An error caused by the user's input, reported without a traceback."""


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Print `warning: message` on stderr, once per process."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


_ABSENT = "<absent>"


def first_difference(stored, given, name: str = ""):
    """(dotted field name, stored value, given value) of the first mismatch between two
    JSON-like values, or None: what a "was made with X, this run has Y" error names."""
    if isinstance(stored, dict) and isinstance(given, dict):
        for key in list(given) + [k for k in stored if k not in given]:
            field = f"{name}.{key}" if name else key
            diff = first_difference(stored.get(key, _ABSENT), given.get(key, _ABSENT), field)
            if diff:
                return diff
        return None
    return None if stored == given else (name, stored, given)


def short_json(value, limit: int = 80) -> str:
    """`value` as JSON, cut to `limit` characters for a one-line message."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."
