"""Decode-time views of images of their own sizes: kdcache's CropLoader against ffcv's own
RandomResizedCropRGBImageDecoder, on one JPEG beton, same threads, batch size and view size.

Usage: python benchmarks/bench_decode.py [--images 2000] [--epochs 3] [--batch-size 256] [--size 224]
It writes a temporary dataset of smooth synthetic images with sides 300-500 px (JPEG quality
90, so files are photo-sized, not noise-sized), then times passes after a first, compiling
one. Our passes include drawing the boxes in torch (timed apart too) and the copy to one
contiguous [B,3,S,S] tensor per slot; ffcv's stop at its own [B,S,S,3] output buffers.
"""

from __future__ import annotations

import os

# torch and ffcv's numba kernels both run on libgomp; see benchmarks/bench_loaders.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from jpeg_data import synthetic_jpeg_dataset  # noqa: E402

from kdcache.data import make_loader  # noqa: E402
from kdcache.data.loaders import FFCV_THREADS  # noqa: E402
from kdcache.replay import ViewReplayer  # noqa: E402


def ffcv_passes(path: Path, batch_size: int, size: int, epochs: int) -> list[float]:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(str(path), batch_size=batch_size, num_workers=FFCV_THREADS, order=OrderOption.RANDOM, seed=0,
                    drop_last=False, os_cache=True,
                    pipelines={"image": [RandomResizedCropRGBImageDecoder((size, size)), ToTensor()],
                               "label": [IntDecoder(), ToTensor()], "index": [IntDecoder(), ToTensor()]})
    times = []
    for _ in range(epochs + 1):
        start = time.perf_counter()
        for _ in loader:
            pass
        times.append(time.perf_counter() - start)
    return times[1:]


def our_passes(data_dir: Path, batch_size: int, size: int, epochs: int, slots: tuple[str, ...]):
    replayer = ViewReplayer.from_policy_names({"weak": "imagenet_weak", "strong": "imagenet_strong"}, 0, size,
                                              [0.5] * 3, [0.25] * 3)
    loader = make_loader(data_dir, "train", batch_size, shuffle=True, seed=0, replayer=replayer)
    times, box_times = [], []
    for epoch in range(epochs + 1):
        loader.set_epoch(epoch)
        loader.set_views(epoch, slots)
        start = time.perf_counter()
        loader._boxes(loader.order())  # drawn again by the pass: timed apart here
        box_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in loader:
            pass
        times.append(time.perf_counter() - start)
    return times[1:], box_times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(300, 501, (args.images, 2))]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        data_dir = synthetic_jpeg_dataset(Path(tmp) / "data", sizes, num_classes=10, num_workers=FFCV_THREADS)
        beton = data_dir / "train.beton"
        print(f"{args.images} JPEGs, sides 300-500 px, {beton.stat().st_size / args.images / 1024:.1f} KiB each on "
              f"average (written in {time.perf_counter() - start:.0f} s); {FFCV_THREADS} decode threads, batch "
              f"{args.batch_size}, views {args.size}x{args.size}, median of {args.epochs} passes after a first")
        n = args.images
        ffcv_rate = n / np.median(ffcv_passes(beton, args.batch_size, args.size, args.epochs))
        rows = [("ffcv RandomResizedCropRGBImageDecoder", 1, ffcv_rate, None)]
        for slots in (("weak",), ("weak", "strong")):
            times, box_times = our_passes(data_dir, args.batch_size, args.size, args.epochs, slots)
            rows.append((f"kdcache CropLoader ({'+'.join(slots)})", len(slots), n / np.median(times),
                         n / np.median(box_times)))
    print(f"{'decoder':<40} {'views/sample':>12} {'samples/s':>10} {'views/s':>9} {'per view vs ffcv':>17} "
          f"{'boxes drawn/s':>14}")
    for name, views, rate, box_rate in rows:
        box = "" if box_rate is None else f"{box_rate * views:,.0f}"
        print(f"{name:<40} {views:>12} {rate:>10,.0f} {rate * views:>9,.0f} {rate * views / ffcv_rate:>16.0%} "
              f"{box:>14}")


if __name__ == "__main__":
    main()
