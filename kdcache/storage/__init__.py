"""The zarr logit store: slabs of teacher logits per (round, view), see docs/store-format.md."""

from kdcache.storage.encodings import (
    Encoding,
    LogitErrors,
    default_encoding,
    get_encoding,
    list_encodings,
    logit_errors,
    measure_encoding,
    warn_if_loss_needs_full_logits,
)
from kdcache.storage.prefetch import SlabPrefetcher
from kdcache.storage.rows import EncodedRows
from kdcache.storage.store import STORE_FORMAT_VERSION, LogitStore, SlabWriter, slab_path

__all__ = [
    "EncodedRows",
    "Encoding",
    "LogitErrors",
    "LogitStore",
    "STORE_FORMAT_VERSION",
    "SlabPrefetcher",
    "SlabWriter",
    "default_encoding",
    "get_encoding",
    "list_encodings",
    "logit_errors",
    "measure_encoding",
    "slab_path",
    "warn_if_loss_needs_full_logits",
]
