"""Per-epoch logs people read, next to a run's metrics.jsonl: metrics.csv and TensorBoard events.

The event file is written by hand rather than with the `tensorboard` package (which pulls
in grpcio, protobuf and werkzeug): it is a TFRecord stream (length, masked CRC-32C, data,
masked CRC-32C) of `Event` protobuf messages, and scalars need only a handful of fields.
The epoch is the step; tags are grouped as TensorBoard shows them (`train/loss`, `test/top1`, `lr`).

Crash safety: metrics.csv is rewritten whole through a temporary file at every epoch; the
event file is appended to, as every TensorBoard writer does (TensorBoard ignores a record a
kill cut short). On resume the engine calls `rewrite_run_log`, which rebuilds both from the
checkpoint's history, so nothing written after the last checkpoint survives.
"""

from __future__ import annotations

import array
import csv
import io
import os
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import google_crc32c

from kdcache.errors import KdcacheError
from kdcache.outputs import remove_stale_temporaries, write_atomic, write_text_atomic

CSV_FILE = "metrics.csv"
EVENTS_PREFIX = "events.out.tfevents."
FILE_VERSION = b"brain.Event:2"


def start_run_log(run_dir: str | Path) -> None:
    """Empty logs for a new run (any left by an earlier run in the dir are removed)."""
    rewrite_run_log(run_dir, [])


def rewrite_run_log(run_dir: str | Path, history: Sequence[Mapping[str, float]]) -> None:
    """Make metrics.csv and the event file hold exactly `history` (on resume: the checkpoint's epochs)."""
    run_dir = Path(run_dir)
    remove_stale_temporaries(run_dir, f".{CSV_FILE}.*.tmp")
    remove_stale_temporaries(run_dir, f".{EVENTS_PREFIX}*.tmp")
    old_event_files = _event_files(run_dir)
    # A new name, so a TensorBoard already watching the dir moves on to it.
    events = run_dir / f"{EVENTS_PREFIX}{time.time_ns()}.kdcache"
    data = _tfrecord(_file_version_event()) + b"".join(_tfrecord(_scalars_event(r)) for r in history)
    write_atomic(events, lambda tmp: tmp.write_bytes(data))
    for path in old_event_files:
        if path != events:
            path.unlink(missing_ok=True)
    write_text_atomic(run_dir / CSV_FILE, _csv_text(list(history)))


def append_epoch(run_dir: str | Path, record: Mapping[str, float]) -> None:
    """Add one epoch's record (the dict engine.fit writes to metrics.jsonl) to metrics.csv and the event file."""
    run_dir = Path(run_dir)
    csv_path = run_dir / CSV_FILE
    rows: list[Mapping[str, object]] = []
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    write_text_atomic(csv_path, _csv_text([*rows, record]))
    event_files = _event_files(run_dir)
    events = event_files[-1] if event_files else run_dir / f"{EVENTS_PREFIX}{time.time_ns()}.kdcache"
    try:
        with open(events, "ab") as f:
            if f.tell() == 0:
                f.write(_tfrecord(_file_version_event()))
            f.write(_tfrecord(_scalars_event(record)))
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise KdcacheError(f"cannot write {events} ({err.strerror}); check free space and permissions") from None


def scalar_tag(key: str) -> str:
    """TensorBoard groups tags by what comes before '/': train/..., test/..., the rest on their own."""
    if key == "best_top1":
        return "test/best_top1"
    prefix, _, rest = key.partition("_")
    return f"{prefix}/{rest}" if prefix in ("train", "test") and rest else key


def _csv_text(rows: list[Mapping[str, object]]) -> str:
    """One row per epoch; the header is every key, in the order keys first appear (a new key adds a column)."""
    header = list(dict.fromkeys(key for row in rows for key in row))
    if not header:
        return ""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _event_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob(f"{EVENTS_PREFIX}*"))


# --- TensorBoard event encoding: protobuf wire format and TFRecord framing ---------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, what: bytes) -> bytes:
    """Event{wall_time = 1 (double), step = 2 (varint), what}."""
    return b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step) + what


def _file_version_event() -> bytes:
    return _event(0, _length_delimited(3, FILE_VERSION))  # Event.file_version = 3


def _summary_value(tag: str, value: float) -> bytes:
    """Summary.Value{tag = 1, simple_value = 2 (float32, fixed32 wire type)}."""
    # array("f") rounds to float32 as TensorBoard's own writers do (out-of-range values become inf).
    return _length_delimited(1, tag.encode()) + b"\x15" + array.array("f", [value]).tobytes()


def _scalars_event(record: Mapping[str, float]) -> bytes:
    """Event.summary = 5: a Summary with one value (field 1) per number of the record but the epoch (the step)."""
    summary = b"".join(_length_delimited(1, _summary_value(scalar_tag(key), value))
                       for key, value in record.items() if key != "epoch" and isinstance(value, (int, float)))
    return _event(int(record["epoch"]), _length_delimited(5, summary))


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C (the store's chunk checksum, from the same library)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord(data: bytes) -> bytes:
    """uint64 length, masked CRC-32C of the length, data, masked CRC-32C of the data (little-endian)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc32c(length)) + data + struct.pack("<I", _masked_crc32c(data))
