"""Dataset ingestion into FFCV betons and loaders yielding (uint8 images, labels, indices)."""

from kdcache.data.loaders import epoch_order, load_split, make_loader
from kdcache.data.meta import DatasetMeta
from kdcache.data.prepare import prepare_dataset
from kdcache.data.sources import list_sources

__all__ = ["DatasetMeta", "epoch_order", "list_sources", "load_split", "make_loader", "prepare_dataset"]
