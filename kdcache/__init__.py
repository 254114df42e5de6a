"""kdcache: cache teacher logits over seeded augmented views, distil students from the cache."""

__version__ = "0.1.0"
