"""User-facing errors.

A `KdcacheError` is something the user can fix (bad path, mismatched store, unknown
name). The CLI prints its message on one line and exits with status 1, no traceback;
the message should say what is wrong and how to fix it.
"""


class KdcacheError(Exception):
    """An error caused by the user's input, reported without a traceback."""
