"""Where one cached-CRLD training step spends its time, part by part, on one device.

    python benchmarks/profile_step.py --out runs/profile-step

Same synthetic data and models as bench_gpu.py (resnet32x4 -> resnet8x4, CIFAR-100 shape).
For each --compile mode and batch size it times, each alone after warm-up (ms, host clock
around `--reps` calls, then one device sync): replaying the weak and the strong view, the
cached teacher's look-up of both, the student's step (forward, loss, backward, SGD), and
the whole `train_batch` (on one batch, and on a new batch each call); then the share of the whole step the GPU is busy (kernel time
from torch.profiler over wall time: far under 1 means launch-bound) and the top kernels.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_gpu import TEACHER, jobs_for
from kdcache.bench import BenchConfig, device_name, make_synthetic_dataset, take_batches
from kdcache.data import make_loader
from kdcache.engine import Trainee, compiled, replay_views, train_batch
from kdcache.models import create_model, save_checkpoint
from kdcache.precompute import PrecomputeConfig, precompute
from kdcache.runtime import DistContext, autocast, pick_device, synchronize


def ms_per_call(fn, device, reps: int) -> float:
    for _ in range(3):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / reps


def gpu_busy(fn, device, reps: int) -> tuple[float, str]:
    """Kernel time over wall time of `reps` calls, and the profiler's top-kernel table."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        synchronize(device)
        wall_us = 1e6 * (time.perf_counter() - start)
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60)
    return kernel_us / wall_us, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--batch-sizes", default="64,512")
    parser.add_argument("--compile-modes", default="off,on")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/profile-step"))
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"profile_step on {device_name(device)}, torch {torch.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kdcache-profile-") as tmp:
        work = Path(tmp)
        meta = make_synthetic_dataset(work, BenchConfig(samples=args.samples))
        ckpt = work / "teacher.pth"
        torch.manual_seed(0)
        save_checkpoint(ckpt, create_model(TEACHER, meta.num_classes), model_name=TEACHER)
        store = precompute(PrecomputeConfig(teacher=TEACHER, ckpt=ckpt, data_dir=work / "data", rounds=1,
                                            views={"weak": "weak", "strong": "strong"}, out=work / "store",
                                            device=str(device)), progress=False)
        for compile_mode in args.compile_modes.split(","):
            replay = compiled(replay_views, compile_mode)
            for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
                job = jobs_for(work / "data", store.path, ckpt, device, "crld", "cached", batch_size, compile_mode)[0]
                trainee, teacher, replayer = Trainee(job, DistContext()), job.teacher, job.replayer
                loader = make_loader(work / "data", "train", batch_size, shuffle=True, device=device, drop_last=True)
                batches = take_batches(loader, args.reps + 3)
                images, labels, indices = batches[0]
                rotation = itertools.cycle(batches)
                round_ = teacher.begin_epoch(0)
                trainee.begin_epoch(0)
                prefixes = {s: replayer.key_prefix(round_, s, device) for s in ("weak", "strong")}
                # Clones: under CUDA graphs a replayed graph's outputs are overwritten by its next replay.
                views = {s: replay(replayer, s, prefixes[s], images, indices).clone() for s in prefixes}

                def lookup():
                    with autocast(device, job.recipe.precision):
                        return {s: teacher.logits(round_, s, views[s], indices) for s in views}

                logits = {s: z.clone() for s, z in lookup().items()}
                parts = {
                    "replay weak": lambda: replay(replayer, "weak", prefixes["weak"], images, indices),
                    "replay strong": lambda: replay(replayer, "strong", prefixes["strong"], images, indices),
                    "teacher look-up": lookup,
                    "student step": lambda: trainee.step(views, logits, labels, 0),
                    "whole step": lambda: train_batch([trainee], round_, images, labels, indices, 0, replay),
                    "whole step, new batch": lambda: train_batch([trainee], round_, *next(rotation), 0, replay),
                }
                if compile_mode == "cudagraphs":
                    parts = {name: (lambda fn=fn: (torch.compiler.cudagraph_mark_step_begin(), fn()))
                             for name, fn in parts.items()}
                times = {name: ms_per_call(fn, device, args.reps) for name, fn in parts.items()}
                busy, table = gpu_busy(parts["whole step"], device, args.reps)
                (args.out / f"kernels-{compile_mode}-b{batch_size}.txt").write_text(table)
                row = {"compile": compile_mode, "batch_size": batch_size, **times, "gpu_busy": busy}
                rows.append(row)
                print(f"{compile_mode:>4} b{batch_size:<4} " + "  ".join(f"{k} {v:6.2f} ms" for k, v in times.items())
                      + f"  GPU busy {busy:.0%}", flush=True)
                teacher.close()
    (args.out / "profile.json").write_text(json.dumps({"device": device_name(device), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
