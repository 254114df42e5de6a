"""Peak memory of both stages on fabricated stores: it must follow a rank's share of the
data and one chunk, not the dataset.

Each figure is the peak resident set (ru_maxrss) of a fresh subprocess doing one thing:

  import   imports only (torch, zarr, kdcache): the floor under every other row
  (d)      precompute's write side: a top-k store of --samples x --classes fabricated
           chunk by chunk through `LogitStore.slab_writer` (encode, measure the error as
           precompute does, write), two views
  (a, b)   one rank's cached teacher over two epochs of that store, world size 1, 2, 4
           (rank 0): `begin_epoch` and `logits` for every batch of the epoch order, both
           views; after each epoch's batches it waits until the prefetch thread has loaded
           the next epoch's rows (as it does while a real epoch trains), so the peak counts
           both epochs' rows
  (c)      the same, world size 1, on dense float16 stores of --dense-samples and twice
           that: RSS grows by the encoded rows held, not by the decoded slab

    python benchmarks/bench_memory.py                      # ImageNet size: 1,281,167 x 1000
    python benchmarks/bench_memory.py --samples 200000     # smaller, faster
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGENET_TRAIN = 1_281_167


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def settle(still_s: float = 3.0, limit_s: float = 300.0) -> None:
    """Wait until the resident set stays within 1 MB for `still_s` seconds (at most `limit_s`):
    the background loading has finished."""
    last, still, began = rss_mb(), 0.0, time.perf_counter()
    while still < still_s and time.perf_counter() - began < limit_s:
        time.sleep(0.25)
        now = rss_mb()
        still, last = (still + 0.25 if abs(now - last) < 1 else 0.0), now


def fabricate(path: str, samples: int, classes: int, encoding: str, measure: bool) -> dict:
    """Write a 1-round, 2-view store of random teacher-like logits, one chunk at a time."""
    import torch

    from kdcache.storage import LogitStore

    store = LogitStore.create(path, identity={"teacher": "fabricated"}, num_samples=samples, num_classes=classes,
                              rounds=1, views=["weak", "strong"], encoding=encoding, overwrite=True)
    gen = torch.Generator().manual_seed(0)
    chunk = torch.empty(store.chunk_rows(), classes)  # reused, as precompute reuses its device buffer
    for view in store.views:
        writer = store.slab_writer(0, view, measure=measure)
        for start in range(0, samples, writer.chunk_rows):
            rows = min(writer.chunk_rows, samples - start)
            logits = torch.randn(rows, classes, generator=gen, out=chunk[:rows]).mul_(2)
            logits[torch.arange(rows), torch.randint(classes, (rows,), generator=gen)] += 12
            writer.append(logits, torch.arange(start, start + rows))
        writer.finish(writer.errors.result() if measure else {})
    return {"chunk_rows": store.chunk_rows(), "chunk_float32_mb": store.chunk_rows() * classes * 4 / 2**20}


def epochs(path: str, world_size: int, rank: int, batch_size: int, count: int) -> dict:
    """A rank's cached teacher over `count` epochs: every batch's logits of both views."""
    import torch

    from kdcache.data import epoch_order
    from kdcache.storage import LogitStore
    from kdcache.teachers import CachedTeacher

    store = LogitStore.open(path)
    n = store.num_samples
    whole_batches = -(-n // world_size) // batch_size * batch_size  # drop_last, as distill's loader

    def order(epoch):
        return epoch_order(n, shuffle=True, seed=0, epoch=epoch, rank=rank, world_size=world_size)[:whole_batches]

    teacher = CachedTeacher(store, store.views, epochs=count)
    teacher.visit(order)
    held = 0
    for epoch in range(count):
        round_ = teacher.begin_epoch(epoch)
        held = max(held, teacher.nbytes)
        for indices in torch.from_numpy(order(epoch)).split(batch_size):
            for slot in store.views:
                teacher.logits(round_, slot, None, indices)
        settle()  # the next epoch's rows land while this one is still held
    teacher.close()
    return {"held_mb": held / 2**20, "rows_held": int(len(set(order(count - 1).tolist())))}


def child(task: str, **kw) -> dict:
    """Run one task in a fresh interpreter; its result with its peak RSS and seconds."""
    code = (f"import json, sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_memory as b; "
            f"t = time.perf_counter(); r = b.{task}(**json.loads(sys.argv[1])); "
            "r.update(seconds=time.perf_counter() - t, peak_rss_mb=b.peak_rss_mb()); print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kw)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def imports() -> dict:
    import torch  # noqa: F401
    import zarr  # noqa: F401

    import kdcache.teachers  # noqa: F401
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=IMAGENET_TRAIN, help="rows of the top-k store")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--encoding", default="topk:20")
    parser.add_argument("--dense-samples", type=int, default=100_000, help="rows of the smaller float16 store (c)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None, help="folder for the stores (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="kdcache-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    def report(case, samples, encoding, world_size, result):
        row = {"case": case, "samples": samples, "classes": args.classes, "encoding": encoding,
               "world_size": world_size, **result}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    try:
        report("import", 0, "-", "-", child("imports"))
        topk = str(work / "topk")
        report("(d) write", args.samples, args.encoding, "-",
               child("fabricate", path=topk, samples=args.samples, classes=args.classes, encoding=args.encoding,
                     measure=True))
        for world_size in (1, 2, 4):
            report("(a,b) epochs", args.samples, args.encoding, world_size,
                   child("epochs", path=topk, world_size=world_size, rank=0, batch_size=args.batch_size, count=2))
        shutil.rmtree(topk)
        for samples in (args.dense_samples, 2 * args.dense_samples):
            dense = str(work / f"dense-{samples}")
            child("fabricate", path=dense, samples=samples, classes=args.classes, encoding="float16", measure=False)
            report("(c) epochs", samples, "float16", 1,
                   child("epochs", path=dense, world_size=1, rank=0, batch_size=args.batch_size, count=2))
            shutil.rmtree(dense)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"{'case':<14}{'samples':>10}{'encoding':>10}{'world':>7}{'rows held':>11}{'held MB':>9}"
          f"{'chunk MB':>10}{'peak RSS MB':>13}{'s':>8}")
    for r in rows:
        print(f"{r['case']:<14}{r['samples']:>10}{r['encoding']:>10}{r['world_size']:>7}{r.get('rows_held', '-'):>11}"
              f"{r.get('held_mb', 0):>9.1f}{r.get('chunk_float32_mb', 0):>10.1f}{r['peak_rss_mb']:>13.0f}"
              f"{r['seconds']:>8.1f}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.0f} s")
