"""Streamed `kdcache data prepare imagefolder`: time and peak memory at N and 8N images.

Usage: python benchmarks/bench_prepare.py [--counts 500,4000] [--sides 100,500] [--max-side N] [--dir DIR]

Makes, per count, an image folder of that many JPEGs (10 classes, 90% train / 10% val,
each side drawn from --sides, so aspect ratios vary), runs the CLI on it in a subprocess
and prints: images, seconds, images/s, and the peak RSS of the prepare process tree
(ru_maxrss from wait4: the largest of the main process and its ffcv writer workers).
The first line is the same figure for `kdcache --help`: what importing kdcache costs.
The target: peak RSS does not grow with the number of images.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10


def make_folder(root: Path, count: int, sides: tuple[int, int], seed: int = 0) -> None:
    """count JPEGs of random smooth content plus noise (photo-like JPEG sizes)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        split = "val" if (i // CLASSES) % 10 == 9 else "train"
        h, w = rng.integers(sides[0], sides[1] + 1, 2)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        f = rng.uniform(0.01, 0.08, 3)
        base = np.stack([128 + 90 * np.sin(f[k] * x + f[(k + 1) % 3] * y + k) for k in range(3)], -1)
        image = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        d = root / split / f"c{i % CLASSES}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(d / f"{i}.jpg", quality=90)


def run(args: list[str]) -> tuple[float, int]:
    """Runs `python -m kdcache.cli ARGS`; returns (seconds, peak RSS in MiB of its process tree)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "kdcache.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"kdcache {' '.join(args)} failed:\n{stderr.decode()[-2000:]}")
    return seconds, usage.ru_maxrss // 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="500,4000", help="image counts, comma-separated")
    parser.add_argument("--sides", default="100,500", help="min,max side in pixels")
    parser.add_argument("--max-side", type=int, default=None, help="passed to prepare")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    args = parser.parse_args()
    sides = tuple(int(s) for s in args.sides.split(","))
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        print(f"cpus {len(os.sched_getaffinity(0))}, sides {sides[0]}..{sides[1]} px, max-side {args.max_side}")
        seconds, rss = run(["--help"])
        print(f"{'kdcache --help':>16}: {seconds:6.1f} s, peak RSS {rss:5d} MiB")
        for count in (int(c) for c in args.counts.split(",")):
            src, out = work / f"src-{count}", work / f"out-{count}"
            if not src.exists():
                make_folder(src, count, sides)
            shutil.rmtree(out, ignore_errors=True)
            extra = ["--max-side", str(args.max_side)] if args.max_side else []
            seconds, rss = run(["data", "prepare", "imagefolder", "--root", str(src), "--out", str(out), *extra])
            size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
            print(f"{count:>9} images: {seconds:6.1f} s, {count / seconds:7.1f} images/s, peak RSS {rss:5d} MiB, "
                  f"betons {size:.0f} MiB")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
