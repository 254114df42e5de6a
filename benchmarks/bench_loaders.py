"""Loader throughput: images/s for the memory and ffcv backends (random order, batch 256).

Usage: python benchmarks/bench_loaders.py [DATA_DIR] [--epochs N]
Without DATA_DIR it prepares a synthetic 50k-image raw 32x32 dataset in a temporary dir.
The first ffcv epoch (numba compilation, ~1.5 s) is reported separately and excluded.
"""

from __future__ import annotations

import os

# torch and ffcv's numba kernels both run on libgomp; with its default busy-wait the two
# thread pools starve each other on a small machine (~16k images/s instead of ~1M here).
# Must be set before torch is imported; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from kdcache.data import make_loader, prepare_dataset  # noqa: E402


def synthetic(directory: Path) -> Path:
    rng = np.random.default_rng(0)
    npz = directory / "synthetic.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 10, 50000),
             x_test=rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 10, 1000))
    prepare_dataset("npz", directory / "data", root=npz)
    return directory / "data"


def bench(data_dir: Path, backend: str, epochs: int) -> None:
    start = time.perf_counter()
    loader = make_loader(data_dir, "train", 256, shuffle=True, seed=0, backend=backend)
    first = None
    rates = []
    for epoch in range(epochs + 1):
        loader.set_epoch(epoch)
        t = time.perf_counter()
        n = sum(len(labels) for _, labels, _ in loader)
        if first is None:
            first = time.perf_counter() - start
        else:
            rates.append(n / (time.perf_counter() - t))
    print(f"{backend:>6}: {np.median(rates):>10,.0f} images/s (median of {epochs} epochs of {n} images; "
          f"setup + first epoch {first:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", type=Path, help="a prepared dataset directory")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or synthetic(Path(tmp))
        print(f"dataset {data_dir}, raw uint8 images, random order, batch 256")
        for backend in ("memory", "ffcv"):
            bench(data_dir, backend, args.epochs)


if __name__ == "__main__":
    main()
