"""The GPU benchmark of the distillation issue, in one run on one device.

    python benchmarks/bench_gpu.py --out runs/bench-gpu.json

On a CIFAR-100-shaped synthetic dataset (50,000 x 32x32, 100 classes, random weights:
throughput does not depend on them), teacher resnet32x4 -> student resnet8x4:
  1. training steps/s of student-only CE, cached CRLD and online CRLD, at batch 64 and 512,
     eager and compiled, with the host syncs of one step;
  2. precompute img/s against plain teacher inference (same precision, same batches) and
     the time to fill one round of the store (50,000 x 100, weak + strong);
  3. aggregate img/s of 1, 2 and 4 students trained in one pass (cached CRLD);
  4. how far a bf16 teacher's logits move between batch compositions and from fp32 (what
     `kdcache verify`'s bf16 tolerance must allow).
It needs torch, torchvision, zarr and numcodecs, not ffcv (the in-memory loader serves).
On a CPU, small --samples and --steps make it a smoke run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import kdcache
from kdcache.bench import BenchConfig, device_name, make_synthetic_dataset, time_steps
from kdcache.data import make_loader
from kdcache.distill import DistillConfig, build_jobs
from kdcache.engine import Trainee, compiled, replay_views
from kdcache.models import create_model, file_sha256, load_teacher, save_checkpoint
from kdcache.precompute import PrecomputeConfig, compute_slab, run_precision, store_identity
from kdcache.recipes import make_recipe
from kdcache.replay import replayer_for
from kdcache.runtime import DistContext, autocast, pick_device, prepare_model, to_model_input
from kdcache.storage import LogitStore

TEACHER, STUDENT = "resnet32x4", "resnet8x4"
MODES = [("ce", "cached"), ("crld", "cached"), ("crld", "online")]  # ce ignores the teacher


def jobs_for(data_dir, store, ckpt, device, loss, mode, batch_size, compile_mode, students=1, out=Path("unused")):
    recipe = make_recipe(STUDENT, epochs=1, batch_size=batch_size, precision="bf16" if device.type == "cuda" else "fp32")
    return build_jobs([DistillConfig(student=STUDENT, loss=loss, data_dir=data_dir, out=out / str(i), recipe=recipe,
                                     store=store, teacher_mode=mode, teacher=TEACHER, ckpt=ckpt, device=str(device),
                                     show_progress=False, compile=compile_mode) for i in range(students)])


def bench_training(args, data_dir, store, ckpt, device, echo) -> list[dict]:
    rows = []
    for compile_mode in args.compile_modes:
        replay = compiled(replay_views, compile_mode)
        for batch_size in args.batch_sizes:
            loader = make_loader(data_dir, "train", batch_size, shuffle=True, device=device, drop_last=True)
            for loss, mode in MODES:
                jobs = jobs_for(data_dir, store, ckpt, device, loss, mode, batch_size, compile_mode)
                elapsed, syncs = time_steps([Trainee(jobs[0], DistContext())], loader, args.steps, args.warmup,
                                            replay)
                views = len(jobs[0].loss.views)
                row = {"loss": loss, "mode": mode if loss != "ce" else "none", "batch_size": batch_size,
                       "compile": compile_mode, "steps_per_s": args.steps / elapsed,
                       "views_per_s": args.steps * batch_size * views / elapsed, "host_syncs_per_step": syncs}
                echo(f"{compile_mode:>4} b{batch_size:<4} {loss:>4} {row['mode']:<6} {row['steps_per_s']:9.1f} steps/s "
                     f"{row['views_per_s']:9.0f} views/s  {syncs} syncs")
                rows.append(row)
                if jobs[0].teacher is not None:
                    jobs[0].teacher.close()
    return rows


def bench_students_per_pass(args, data_dir, store, ckpt, device, echo) -> list[dict]:
    rows = []
    compile_mode = args.compile_modes[-1]
    replay = compiled(replay_views, compile_mode)
    loader = make_loader(data_dir, "train", args.batch_sizes[0], shuffle=True, device=device, drop_last=True)
    for students in (1, 2, 4):
        jobs = jobs_for(data_dir, store, ckpt, device, "crld", "cached", args.batch_sizes[0], compile_mode, students)
        elapsed, _ = time_steps([Trainee(job, DistContext()) for job in jobs], loader, args.steps, args.warmup, replay)
        rate = students * args.steps * args.batch_sizes[0] / elapsed
        echo(f"{students} student(s) per pass ({compile_mode}): {rate:.0f} img/s together")
        rows.append({"students": students, "compile": compile_mode, "images_per_s": rate})
        jobs[0].teacher.close()
    return rows


def bench_precompute(args, meta, data_dir, store_path, ckpt, device, echo) -> dict:
    """One round of precompute (weak + strong) against plain inference of the same teacher."""
    cfg = PrecomputeConfig(teacher=TEACHER, ckpt=ckpt, data_dir=data_dir, views={"weak": "weak", "strong": "strong"},
                           rounds=1, device=str(device))
    precision = run_precision(cfg.precision, device)
    store = LogitStore.create(store_path, identity=store_identity(cfg, meta, file_sha256(ckpt)),
                              num_samples=meta.counts["train"], num_classes=meta.num_classes, rounds=1,
                              views=list(cfg.views))
    teacher = prepare_model(load_teacher(TEACHER, ckpt, meta.num_classes), device)
    batch_size = 1024 if device.type == "cuda" else 256
    loader = make_loader(data_dir, "train", batch_size, shuffle=False, device=device)
    replayer = replayer_for(store)

    @torch.no_grad()
    def plain_inference() -> float:
        start = time.perf_counter()
        with autocast(device, precision):
            outputs = [teacher(to_model_input(replayer(0, "weak", images, indices))).float()
                       for images, _, indices in loader]
        torch.cat(outputs).cpu()
        return time.perf_counter() - start

    plain_inference()  # warm-up
    plain = meta.counts["train"] / plain_inference()
    round_s = sum(compute_slab(store, teacher, replayer, loader, 0, slot, meta, precision) for slot in store.views)
    cached = 2 * meta.counts["train"] / round_s
    echo(f"precompute ({precision}): {cached:.0f} img/s, one round (2 views) in {round_s:.2f}s; plain inference "
         f"{plain:.0f} img/s ({cached / plain:.2f}x)")
    return {"precision": precision, "images_per_s": cached, "plain_inference_images_per_s": plain,
            "seconds_per_round": round_s, "rounds_240_minutes": 240 * round_s / 60}


@torch.no_grad()
def bench_bf16_drift(meta, data_dir, ckpt, device, echo) -> dict:
    """Max |logit difference| of a bf16 teacher between batch sizes 1024 and 37, and to fp32."""
    if device.type != "cuda":
        return {}
    teacher = prepare_model(load_teacher(TEACHER, ckpt, meta.num_classes), device)
    images, _, indices = next(iter(make_loader(data_dir, "train", 1024, shuffle=False, device=device)))
    x = to_model_input(images.float() / 255.0)

    def logits(precision, chunk):
        with autocast(device, precision):
            return torch.cat([teacher(part).float() for part in x.split(chunk)])

    bf16 = logits("bf16", 1024)
    drift = {"bf16_batch_max_abs_diff": float((bf16 - logits("bf16", 37)).abs().max()),
             "bf16_vs_fp32_max_abs_diff": float((bf16 - logits("fp32", 1024)).abs().max()),
             "logit_abs_max": float(bf16.abs().max())}
    echo(f"bf16 teacher: max |dz| {drift['bf16_batch_max_abs_diff']:.3g} across batch sizes, "
         f"{drift['bf16_vs_fp32_max_abs_diff']:.3g} from fp32 (|z| up to {drift['logit_abs_max']:.3g})")
    return drift


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=50_000)
    # 50 steps (~0.5 s) after 10 read up to 1.75x apart between runs of the same code on an H100.
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--batch-sizes", default="64,512")
    parser.add_argument("--compile-modes", default="off,on", help="off, on, cudagraphs (comma-separated)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-gpu.json"))
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.compile_modes = args.compile_modes.split(",")
    device = pick_device(args.device)
    echo = lambda line: print(line, flush=True)  # noqa: E731
    result = {"device": device_name(device), "torch": torch.__version__, "kdcache": kdcache.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "teacher": TEACHER, "student": STUDENT,
              "samples": args.samples}
    echo(f"bench_gpu on {result['device']}, {args.samples} samples")
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-gpu-") as tmp:
        work = Path(tmp)
        meta = make_synthetic_dataset(work, BenchConfig(samples=args.samples, batch_size=max(args.batch_sizes)))
        ckpt = work / "teacher.pth"
        torch.manual_seed(0)
        save_checkpoint(ckpt, create_model(TEACHER, meta.num_classes), model_name=TEACHER)
        data_dir, store = work / "data", work / "store"
        result["precompute"] = bench_precompute(args, meta, data_dir, store, ckpt, device, echo)
        result["bf16_drift"] = bench_bf16_drift(meta, data_dir, ckpt, device, echo)
        result["training"] = bench_training(args, data_dir, store, ckpt, device, echo)
        result["students_per_pass"] = bench_students_per_pass(args, data_dir, store, ckpt, device, echo)
    rates = {(r["compile"], r["batch_size"], r["loss"], r["mode"]): r["steps_per_s"] for r in result["training"]}
    result["ratios"] = {}
    for compile_mode in args.compile_modes:
        for b in args.batch_sizes:
            cached, online, alone = (rates[(compile_mode, b, *key)] for key in
                                     (("crld", "cached"), ("crld", "online"), ("ce", "none")))
            result["ratios"][f"{compile_mode}_b{b}_cached_vs_online_crld"] = cached / online
            result["ratios"][f"{compile_mode}_b{b}_cached_crld_per_view_vs_student_only"] = 2 * cached / alone
    for name, value in result["ratios"].items():
        echo(f"{name:<50}{value:6.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    echo(f"saved {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
