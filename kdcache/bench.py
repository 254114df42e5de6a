"""`kdcache bench`: the throughput comparison users care about, measured in one process.

Every figure comes from the code paths training and precompute use (`engine.train_batch`,
`precompute.compute_slab`), on one synthetic CIFAR-100-shaped dataset, one device and one
run, so the ratios between modes are what matters; absolute times depend on the machine.
Weights are random: throughput does not depend on them. Host syncs per step are counted
on the device code path (dense views), on whatever device runs the bench.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import kdcache
from kdcache.augment import normalize
from kdcache.data import DatasetMeta, make_loader, prepare_dataset
from kdcache.distill import DistillConfig, build_job
from kdcache.augment.census import OpCensus
from kdcache.engine import Trainee, replay_views, shared_teacher, train_batch
from kdcache.errors import KdcacheError
from kdcache.models import create_model, file_sha256, load_teacher, save_checkpoint
from kdcache.outputs import write_text_atomic
from kdcache.precompute import PrecomputeConfig, compute_slab, store_identity
from kdcache.replay import replayer_for
from kdcache.recipes import make_recipe
from kdcache.runtime import DistContext, autocast, pick_device, prepare_model, synchronize, to_model_input
from kdcache.storage import LogitStore, list_encodings, measure_encoding

# (loss, teacher mode) pairs compared, in the order of the distill issue's table.
MODES = [("ce", "none"), ("crld", "cached"), ("crld", "online"), ("kd", "cached"), ("kd", "online")]


@dataclass
class BenchConfig:
    teacher: str = "resnet32x4"
    student: str = "resnet8x4"
    num_classes: int = 100
    image_size: int = 32
    samples: int = 1024  # training samples in the synthetic dataset (one slab)
    batch_size: int = 64
    steps: int = 8  # timed training steps per mode
    warmup: int = 2
    precompute_batch_size: int = 256
    precision: str = "fp32"
    device: str | None = None

    def validate(self) -> None:
        """One-line errors before any work: a bench that cannot measure anything should not start."""
        if self.steps < 1 or self.warmup < 0:
            raise KdcacheError(f"--steps must be at least 1, got {self.steps}")
        if not 1 <= self.batch_size <= self.samples:
            raise KdcacheError(f"--batch-size must lie in 1..--samples ({self.samples}), got {self.batch_size}")
        if self.samples > MAX_SAMPLES:
            raise KdcacheError(f"--samples must be at most {MAX_SAMPLES}, got {self.samples}")
        if self.precision not in ("fp32", "bf16"):
            raise KdcacheError(f"--precision must be fp32 or bf16, got '{self.precision}'")


MAX_SAMPLES = 1 << 20  # a synthetic slab per view: 1M CIFAR-sized images is already 3 GB


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def make_synthetic_dataset(out: Path, cfg: BenchConfig) -> DatasetMeta:
    """Random uint8 images with the shape and class count of the benchmarked recipe."""
    rng = np.random.default_rng(0)
    shape = (cfg.image_size, cfg.image_size, 3)
    test = max(cfg.batch_size, 64)
    np.savez(out / "synthetic.npz",
             x_train=rng.integers(0, 256, (cfg.samples, *shape), dtype=np.uint8),
             y_train=rng.integers(0, cfg.num_classes, cfg.samples),
             x_test=rng.integers(0, 256, (test, *shape), dtype=np.uint8),
             y_test=rng.integers(0, cfg.num_classes, test))
    return prepare_dataset("npz", out / "data", root=out / "synthetic.npz")


def run_bench(cfg: BenchConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure precompute vs plain inference, store sizes, and training steps/s per mode."""
    cfg.validate()
    device = pick_device(cfg.device)
    if cfg.precision == "bf16" and device.type != "cuda":
        raise KdcacheError(f"--precision bf16 runs on CUDA only; on {device} use --precision fp32")
    result: dict[str, Any] = {"config": asdict(cfg), "device": device_name(device), "torch": torch.__version__,
                              "kdcache": kdcache.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        work = Path(tmp)
        echo(f"bench on {result['device']}: {cfg.teacher} -> {cfg.student}, {cfg.samples} samples "
             f"{cfg.image_size}px, {cfg.num_classes} classes")
        meta = make_synthetic_dataset(work, cfg)
        data_dir = work / "data"
        ckpt = work / "teacher.pth"
        torch.manual_seed(0)
        save_checkpoint(ckpt, create_model(cfg.teacher, cfg.num_classes), model_name=cfg.teacher)

        result["precompute"], result["encodings"] = _bench_precompute(cfg, meta, data_dir, ckpt, work / "store",
                                                                      device, echo)
        result["training"] = _bench_training(cfg, meta, data_dir, ckpt, work / "store", device, echo)
    steps = {f"{r['loss']}/{r['mode']}": r["steps_per_s"] for r in result["training"]}
    result["ratios"] = {
        "cached_crld_vs_online_crld": steps["crld/cached"] / steps["crld/online"],
        "cached_kd_vs_online_kd": steps["kd/cached"] / steps["kd/online"],
        # Per view: a CRLD step trains on two views, a CE step on one.
        "cached_crld_per_view_vs_student_only": 2 * steps["crld/cached"] / steps["ce/none"],
        "cached_kd_vs_student_only": steps["kd/cached"] / steps["ce/none"],
        "precompute_vs_plain_inference": result["precompute"]["precompute_images_per_s"]
        / result["precompute"]["plain_inference_images_per_s"],
    }
    return result


def _bench_precompute(cfg, meta, data_dir, ckpt, store_path, device, echo):
    """Precompute's slab loop (views, teacher, encode, write) against teacher(normalize(x)) on the same batches."""
    pcfg = PrecomputeConfig(teacher=cfg.teacher, ckpt=ckpt, data_dir=data_dir, views={"weak": "weak", "strong": "strong"},
                            rounds=1, batch_size=cfg.precompute_batch_size, precision=cfg.precision)
    store = LogitStore.create(store_path, identity=store_identity(pcfg, meta, file_sha256(ckpt)),
                              num_samples=meta.counts["train"], num_classes=meta.num_classes, rounds=1,
                              views=list(pcfg.views))
    teacher = prepare_model(load_teacher(cfg.teacher, ckpt, meta.num_classes), device)
    loader = make_loader(data_dir, "train", cfg.precompute_batch_size, shuffle=False, device=device)

    def plain_inference() -> float:
        """Seconds for teacher(normalize(x)) over every batch of the slab."""
        start = time.perf_counter()
        with torch.no_grad(), autocast(device, cfg.precision):
            outputs = [teacher(to_model_input(normalize(images, meta.mean, meta.std))).float() for images, _, _ in loader]
        torch.cat(outputs).cpu()
        return time.perf_counter() - start

    plain_inference()  # warm-up: kernels, loader, allocator
    before = plain_inference()
    replayer = replayer_for(store)
    seconds = sum(compute_slab(store, teacher, replayer, loader, 0, slot, meta, cfg.precision) for slot in store.views)
    # Plain inference before and after precompute, averaged, so drifting machine load cancels.
    plain = 2 * meta.counts["train"] / (before + plain_inference())
    cached = len(store.views) * meta.counts["train"] / seconds
    echo(f"precompute {cached:.0f} img/s vs plain inference {plain:.0f} img/s ({cached / plain:.2f}x)")
    encodings = _bench_encodings(store, teacher, loader)
    return {"precompute_images_per_s": cached, "plain_inference_images_per_s": plain}, encodings


def _bench_encodings(store: LogitStore, teacher, loader) -> list[dict[str, Any]]:
    """Bytes per view-sample and reconstruction error of each encoding, on float32 teacher
    logits of the store's first slab views (one loader batch)."""
    replayer = replayer_for(store)
    images, _, indices = next(iter(loader))
    with torch.no_grad():
        logits = teacher(to_model_input(replayer(0, store.views[0], images, indices))).float().cpu()
    rows = []
    for name in (n for n in list_encodings() if ":" not in n):  # "topk:K" is a pattern, "topk" its default
        m = measure_encoding(logits, name)
        rows.append({**m, "bytes_per_view_sample": m["bytes_per_row"] + 8})
    return rows


def _bench_training(cfg: BenchConfig, meta, data_dir, ckpt, store_path, device, echo) -> list[dict[str, Any]]:
    """steps/s of `train_batch` for each (loss, teacher mode), the same batches for all,
    and the host syncs one step makes on the device code path."""
    rows = []
    for loss, mode in MODES:
        recipe = make_recipe(cfg.student, epochs=1, batch_size=cfg.batch_size, precision=cfg.precision)
        job = build_job(DistillConfig(student=cfg.student, loss=loss, data_dir=data_dir, out=Path("unused"),
                                      recipe=recipe, store=store_path if mode != "none" else None,
                                      teacher_mode=mode if mode != "none" else "cached", teacher=cfg.teacher,
                                      ckpt=ckpt, device=str(device), show_progress=False))
        loader = make_loader(data_dir, "train", cfg.batch_size, shuffle=True, device=device, drop_last=True)
        elapsed, syncs = time_steps([Trainee(job, DistContext())], loader, cfg.steps, cfg.warmup)
        if job.teacher is not None:
            job.teacher.close()
        row = {"loss": loss, "mode": mode, "views": len(job.loss.views), "steps_per_s": cfg.steps / elapsed,
               "images_per_s": cfg.steps * cfg.batch_size / elapsed, "host_syncs_per_step": syncs}
        echo(f"{loss:>4} {mode:<6} {row['steps_per_s']:.3f} steps/s, {syncs} host syncs per step")
        rows.append(row)
    return rows


def time_steps(trainees: list[Trainee], loader, steps: int, warmup: int, replay=replay_views) -> tuple[float, int | None]:
    """Seconds for `steps` steps of `trainees` (one pass) at epoch 0 after `warmup` steps
    (compilation included there), and the host syncs of one step (counted for a single trainee)."""
    teacher = shared_teacher(trainees)
    round_ = teacher.begin_epoch(0) if teacher is not None else 0
    for t in trainees:
        t.begin_epoch(0)
    batches = take_batches(loader, warmup + steps)
    device = trainees[0].job.device
    for batch in batches[:warmup]:
        train_batch(trainees, round_, *batch, 0, replay)
    synchronize(device)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        train_batch(trainees, round_, *batch, 0, replay)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return elapsed, count_step_syncs(trainees[0], round_, batches[0]) if len(trainees) == 1 else None


def count_step_syncs(trainee: Trainee, round_: int, batch) -> int:
    """Host syncs of one training step on the device code path (dense views), counted at
    the dispatcher, so a machine without a GPU counts what a GPU would wait for."""
    replayer = trainee.job.replayer
    dense, replayer.dense = replayer.dense, True
    try:
        with OpCensus() as census:
            train_batch([trainee], round_, *batch, 0)
    finally:
        replayer.dense = dense
    return census.sync_count


def take_batches(loader, n: int) -> list:
    """`n` batches, cycling over epochs if the split is short (kept in memory: timing excludes loading)."""
    batches, epoch = [], 0
    while len(batches) < n:
        loader.set_epoch(epoch)
        batches += [tuple(t.clone() for t in batch) for batch in loader][: n - len(batches)]
        epoch += 1
    return batches


def format_table(result: dict[str, Any]) -> str:
    """The bench result as a plain-text table, ratios last."""
    lines = [f"device: {result['device']}  torch {result['torch']}  kdcache {result['kdcache']}  {result['date']}",
             f"{result['config']['teacher']} -> {result['config']['student']}, batch {result['config']['batch_size']}",
             "", f"{'mode':<14}{'views':>6}{'steps/s':>10}{'img/s':>10}{'host syncs/step':>17}"]
    for r in result["training"]:
        lines.append(f"{r['loss'] + ' ' + r['mode']:<14}{r['views']:>6}{r['steps_per_s']:>10.3f}{r['images_per_s']:>10.1f}"
                     f"{r['host_syncs_per_step']:>17}")
    p = result["precompute"]
    lines += ["", f"precompute {p['precompute_images_per_s']:.1f} img/s, plain teacher inference "
                  f"{p['plain_inference_images_per_s']:.1f} img/s", "",
              f"{'encoding':<10}{'bytes/view-sample':>19}{'max |dz|':>11}{'KL T=4':>10}"]
    for e in result["encodings"]:
        lines.append(f"{e['encoding']:<10}{e['bytes_per_view_sample']:>19}{e['max_abs_error']:>11.2e}{e['mean_kl_t4']:>10.2e}")
    lines.append("")
    lines += [f"{name:<40}{value:>7.2f}x" for name, value in result["ratios"].items()]
    return "\n".join(lines)


def save_result(result: dict[str, Any], path: Path) -> None:
    if Path(path).is_dir():
        raise KdcacheError(f"--out {path} is a directory; give a file name such as runs/bench.json")
    write_text_atomic(Path(path), json.dumps(result, indent=2) + "\n")
