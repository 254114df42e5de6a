"""kdcache: cache teacher logits over seeded augmented views, distil students from the cache."""

import os

# torch and ffcv's numba kernels share the OpenMP runtime; with its default busy-waiting
# they starve each other (loaders measured up to 60x slower). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
