"""Stage 1: run the teacher over every (round, view) slab of the training set and store
its logits; and `verify`, which recomputes a sample of stored views and compares.

A slab is the unit of work: one writer computes it whole and marks it complete, so a
restarted run redoes only incomplete slabs, and under torchrun slab k belongs to rank
k mod world_size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kdcache.data import DatasetMeta, load_split, make_loader
from kdcache.runtime import autocast, evaluate, init_distributed, pick_device, prepare_model, to_model_input
from kdcache.errors import KdcacheError, warn_once
from kdcache.models import file_sha256, load_teacher
from kdcache.paths import default_store_path
from kdcache.replay import ViewReplayer, replayer_for, view_size
from kdcache.storage import LogitStore, default_encoding, get_encoding
from kdcache.storage.store import MAX_ROUNDS


@dataclass
class PrecomputeConfig:
    teacher: str
    ckpt: Path
    data_dir: Path
    views: dict[str, str]  # slot -> policy name
    rounds: int
    out: Path | None = None  # None: the content-addressed default under KDCACHE_HOME
    encoding: str = "auto"  # auto: storage.default_encoding(num_classes)
    seed: int = 0
    batch_size: int | None = None  # None: 256 on CPU (larger batches measured 2x slower there), 1024 on CUDA
    precision: str = "auto"  # auto: bf16 on CUDA (float32 logits out), fp32 elsewhere
    device: str | None = None
    overwrite: bool = False
    backend: str = "auto"
    trust_checkpoint: bool = False  # unpickle a teacher file holding arbitrary Python objects
    image_size: int | None = None  # views' side for images of their own sizes (None: replay.OWN_SIZE_IMAGE_SIZE)


def store_identity(cfg: PrecomputeConfig, meta: DatasetMeta, ckpt_sha256: str) -> dict[str, Any]:
    """What must match for two runs to share a store (rounds may grow, so they are not part of it)."""
    image_size = view_size(meta, cfg.image_size)
    replayer = ViewReplayer.from_policy_names(cfg.views, cfg.seed, image_size, meta.mean, meta.std)
    return {
        "teacher": cfg.teacher,
        "teacher_sha256": ckpt_sha256,
        "dataset_fingerprint": meta.fingerprint,
        "image_size": image_size,
        "mean": list(meta.mean),
        "std": list(meta.std),
        "policies": replayer.slot_specs,
        "store_seed": cfg.seed,
        "encoding": store_encoding(cfg, meta),
    }


def store_encoding(cfg: PrecomputeConfig, meta: DatasetMeta) -> str:
    """The encoding asked for; `auto` is float16 below 500 classes, else top-k (default_encoding)."""
    return default_encoding(meta.num_classes) if cfg.encoding == "auto" else cfg.encoding


def check_config(cfg: PrecomputeConfig) -> None:
    """Refuse values precompute cannot mean, before it loads or creates anything.

    Views, encoding against the class count and an existing store are checked by
    `LogitStore.create`, also before anything is written.
    """
    if not 1 <= cfg.rounds <= MAX_ROUNDS:
        raise KdcacheError(f"--rounds must be between 1 and {MAX_ROUNDS} (one round per student epoch), "
                           f"got {cfg.rounds}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise KdcacheError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if not 0 <= cfg.seed < 2**64:
        raise KdcacheError(f"--seed must be between 0 and 2^64-1 (view keys are 64-bit), got {cfg.seed}")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise KdcacheError(f"--precision must be auto, fp32 or bf16, got '{cfg.precision}'")
    if cfg.encoding != "auto":
        get_encoding(cfg.encoding)


def run_precision(precision: str, device: torch.device) -> str:
    """The precision that really runs: auto is bf16 on CUDA and fp32 elsewhere; bf16
    autocast exists only on CUDA here."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        warn_once(f"--precision bf16 runs on CUDA only; this run on {device.type} uses fp32 "
                  "(each slab records the precision it was computed in)")
        return "fp32"
    return precision


def precompute(cfg: PrecomputeConfig, progress: bool = True) -> LogitStore:
    """Fill the store for `cfg`, computing only slabs not yet complete (or damaged); returns the store.

    Each slab is computed under its lock, so concurrent precomputes on one store share
    the work: one skips the slabs another holds and waits for them at the end.
    """
    check_config(cfg)
    device = pick_device(cfg.device)
    precision = run_precision(cfg.precision, device)
    ctx = init_distributed(device)
    meta = DatasetMeta.load(cfg.data_dir)
    teacher = prepare_model(load_teacher(cfg.teacher, cfg.ckpt, meta.num_classes, cfg.trust_checkpoint), device)
    identity = store_identity(cfg, meta, file_sha256(cfg.ckpt))
    path = Path(cfg.out) if cfg.out is not None else default_store_path(identity)
    if ctx.is_main:
        store = LogitStore.create(path, identity=identity, num_samples=meta.counts["train"],
                                  num_classes=meta.num_classes, rounds=cfg.rounds, views=list(cfg.views),
                                  encoding=identity["encoding"], overwrite=cfg.overwrite)
        if "teacher_test_top1" not in store.attrs:
            acc = evaluate(teacher, cfg.data_dir, meta, device, precision=precision, image_size=identity["image_size"])
            store.update_attrs({"teacher_test_top1": acc["top1"], "teacher_test_top5": acc["top5"]})
    ctx.barrier()
    if not ctx.is_main:
        store = LogitStore.open(path, mode="r+")

    # --rounds N asks for rounds 0..N-1; the store may declare more (rounds never shrink).
    all_slabs = [(r, slot) for r in range(cfg.rounds) for slot in cfg.views]
    # deep: a slab that fails its checksums is recomputed (reading costs ~1% of computing).
    todo = [key for key in all_slabs[ctx.rank::ctx.world_size] if not store.is_complete(*key, deep=True)]
    replayer = replayer_for(store)
    batch_size = min(cfg.batch_size or (1024 if device.type == "cuda" else 256), meta.counts["train"])
    loader = make_loader(cfg.data_dir, "train", batch_size, shuffle=False, device=device, backend=cfg.backend,
                         replayer=replayer)
    bar = tqdm(total=len(todo), desc=f"precompute {path.name}", unit="slab", disable=not (progress and ctx.is_main),
               dynamic_ncols=True)

    def compute(round_: int, slot: str) -> None:
        elapsed = compute_slab(store, teacher, replayer, loader, round_, slot, meta, precision)
        bar.set_postfix(img_s=f"{meta.counts['train'] / elapsed:.0f}", round=round_, view=slot)

    for key in _under_slab_locks(store, todo, compute):
        bar.update(1)
    bar.close()
    ctx.barrier()
    return store


def _under_slab_locks(store: LogitStore, keys: list[tuple[int, str]], compute):
    """Compute each slab of `keys` that is still missing while holding its lock; yield each key done.

    Slabs another process holds are skipped at first and waited for at the end, then
    computed only if that process did not finish them (it died or was interrupted).
    """
    def compute_holding(key, lock) -> None:
        """With the slab's lock held: compute it unless it is complete (and undamaged)."""
        try:
            if not store.is_complete(*key, deep=True):
                compute(*key)
        finally:
            lock.release()

    held_elsewhere = []
    for key in keys:
        lock = store.slab_lock(*key)
        if lock.try_acquire():
            compute_holding(key, lock)
            yield key
        else:
            held_elsewhere.append((key, lock))
    for key, lock in held_elsewhere:
        warn_once(f"waiting for another kdcache process (pid {lock.holder()}) computing slabs of {store.path}")
        lock.acquire()
        compute_holding(key, lock)
        yield key


def compute_slab(store: LogitStore, teacher: nn.Module, replayer: ViewReplayer, loader, round_: int, slot: str,
                 meta: DatasetMeta, precision: str) -> float:
    """Compute, encode and write one slab chunk by chunk (then mark it complete); returns the
    seconds it took.

    The slab records the precision that really ran (see `run_precision`), the teacher's
    speed (encoding and writing excluded) and the encoding's error, measured on every row
    as it is written."""
    precision = run_precision(precision, next(teacher.parameters()).device)
    start = time.perf_counter()
    writer = store.slab_writer(round_, slot, measure=True)
    write_s = 0.0

    def write(logits: torch.Tensor, seeds: torch.Tensor) -> None:
        nonlocal write_s
        began = time.perf_counter()
        writer.append(logits, seeds)
        write_s += time.perf_counter() - began

    correct = run_teacher_on_slab(teacher, replayer, loader, round_, slot, meta, precision, write, writer.chunk_rows)
    encoding_error = writer.errors.result()
    writer.finish(stats={
        "teacher_top1": 100.0 * correct / meta.counts["train"],
        "images_per_s": meta.counts["train"] / (time.perf_counter() - start - write_s),
        "precision": precision,
        **{k: encoding_error[k] for k in ("max_abs_error", "mean_kl_t1", "mean_kl_t4")},
    })
    return time.perf_counter() - start


@torch.no_grad()
def run_teacher_on_slab(teacher: nn.Module, replayer: ViewReplayer, loader, round_: int, slot: str,
                        meta: DatasetMeta, precision: str, write, chunk_rows: int) -> int:
    """Run the teacher on every view of one slab and hand its float32 logits and the view
    seeds to `write(logits [rows, C], seeds [rows])` (CPU tensors) in sample order,
    `chunk_rows` rows at a time; returns the number of views it classifies right.

    A chunk accumulates on the teacher's device and comes back in one copy when full: one
    host sync per chunk, none per batch, and never more than a chunk of logits held."""
    n = meta.counts["train"]
    device = next(teacher.parameters()).device
    chunk_rows = min(chunk_rows, n)
    logits = torch.empty(chunk_rows, meta.num_classes, dtype=torch.float32, device=device)
    seeds = torch.empty(chunk_rows, dtype=torch.int64, device=device)
    rows = torch.empty(chunk_rows, dtype=torch.int64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loader.set_views(round_, (slot,))
    done = filled = 0  # rows written, rows of the current chunk filled
    for images, labels, indices in loader:
        views = to_model_input(replayer(round_, slot, images, indices))
        with autocast(device, precision):
            out = teacher(views).float()
        correct += (out.argmax(1) == labels).sum()
        batch = (out, replayer.seeds(round_, slot, indices), indices)
        taken = 0
        while taken < len(indices):  # a batch may end one chunk and start the next
            size = min(len(indices) - taken, chunk_rows - filled)
            for buffer, part in zip((logits, seeds, rows), batch):
                buffer[filled:filled + size] = part[taken:taken + size]
            filled, taken = filled + size, taken + size
            if filled == min(chunk_rows, n - done):
                if not torch.equal(rows[:filled].cpu(), torch.arange(done, done + filled)):
                    raise RuntimeError("precompute needs the loader's batches in sample order (shuffle=False)")
                write(logits[:filled].cpu(), seeds[:filled].cpu())
                done, filled = done + filled, 0
    if done != n:
        raise RuntimeError(f"the loader gave {done + filled} of the slab's {n} samples")
    return int(correct)


# verify's default tolerance per precision a slab ran in (logit units, beyond the encoding
# error): fp32 differs only by batch composition. bf16 logits carry 8 significant bits, so
# their step grows with the logit: on an H100 a bf16 resnet32x4's logits (|z| up to 47) moved
# by 0.25, one bf16 step at that size, between batches of 1024 and 37 (docs/benchmarks.md).
# A bf16 row may thus differ by two steps of its largest logit, and never less than 5e-2.
VERIFY_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}
BF16_STEPS = 2 * 2.0 ** -7  # two bf16 steps, relative to the row's largest |logit|


def verify_bounds(fresh: torch.Tensor, precision: str, encoding_error: float, tolerance: float | None) -> torch.Tensor:
    """Per row of recomputed logits, the largest |stored - recomputed| that verify accepts:
    the slab's recorded encoding error plus `tolerance`, or by default VERIFY_TOLERANCE of the
    precision, relative to the row's largest logit in bf16."""
    if tolerance is not None:
        allowed = torch.full((len(fresh),), float(tolerance))
    elif precision == "bf16":
        allowed = (BF16_STEPS * fresh.abs().amax(dim=1)).clamp(min=VERIFY_TOLERANCE["bf16"])
    else:
        allowed = torch.full((len(fresh),), VERIFY_TOLERANCE[precision])
    return encoding_error + allowed.to(fresh.device)


def verify(store_path: Path, ckpt: Path, data_dir: Path, samples: int = 512, tolerance: float | None = None,
           device: str | None = None, seed: int = 0, batch_size: int = 256, trusted: bool = False,
           progress: bool = False) -> dict[str, Any]:
    """Recompute the teacher on `samples` random stored views and compare with the store.

    A view passes when |stored - recomputed| <= `verify_bounds` (the slab's recorded encoding
    error + tolerance; by default per the precision the slab was computed in) and its seed
    equals the one the store recorded. `samples` beyond the stored views checks every
    stored view once.
    """
    if samples < 1:
        raise KdcacheError(f"--samples must be at least 1, got {samples}")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise KdcacheError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    store = LogitStore.open(store_path)
    ident = store.identity
    meta = DatasetMeta.load(data_dir)
    if meta.fingerprint != ident.get("dataset_fingerprint"):
        raise KdcacheError(f"{data_dir} is not the dataset this store was made from (fingerprint differs)")
    sha = file_sha256(ckpt)
    if sha != ident.get("teacher_sha256"):
        raise KdcacheError(f"{ckpt} is not the checkpoint this store was made from (sha256 differs)")
    damaged = store.damaged_slabs()
    if damaged:
        raise store.damaged_error(*damaged[0])
    complete = store.complete_slabs()
    if not complete:
        raise KdcacheError(f"{store_path} has no complete slab to verify; run precompute first")
    dev = pick_device(device)
    teacher = prepare_model(load_teacher(ident["teacher"], ckpt, store.num_classes, trusted), dev)
    replayer = replayer_for(store)
    # Images of their own sizes are not held: the checked views are cut at decode time.
    crops = make_loader(data_dir, "train", batch_size, shuffle=False, replayer=replayer) if meta.own_size else None
    images = None if meta.own_size else load_split(data_dir, "train")[0]
    n = store.num_samples
    # Distinct (slab, row) picks, without materialising all len(complete) * n of them.
    total = len(complete) * n
    flat = np.sort(np.random.default_rng(seed).choice(total, size=min(samples, total), replace=False))
    max_diff = sum_diff = 0.0
    agree = seeds_ok = passed = 0
    slabs = list(zip(*np.unique(flat // n, return_index=True, return_counts=True)))
    for slab_i, first, count in tqdm(slabs, desc="verify", unit="slab", leave=False, disable=not progress,
                                            dynamic_ncols=True):
        round_, slot = complete[slab_i]
        idx = torch.from_numpy(flat[first:first + count] % n)
        stored = store.slab(round_, slot, rows=idx)  # idx is sorted and distinct: only these rows are read
        stats = store.slab_stats(round_, slot)
        precision = run_precision(stats.get("precision", "fp32"), dev)
        if crops is None:
            batches = ((images[part], part) for part in idx.split(batch_size))
        else:
            crops.set_views(round_, (slot,))
            batches = ((views, part.cpu()) for views, _, part in crops.batches_of(idx.numpy()))
        fresh = torch.cat([_teacher_logits(teacher, replayer, (round_, slot), views, part, precision)
                           for views, part in batches])
        diff = (stored - fresh).abs().amax(dim=1)
        bound = verify_bounds(fresh, precision, stats.get("max_abs_error", 0.0), tolerance)
        max_diff = max(max_diff, float(diff.max()))
        sum_diff += float((stored - fresh).abs().mean(dim=1).sum())
        agree += int((stored.argmax(1) == fresh.argmax(1)).sum())
        seeds_ok += int((store.seeds(round_, slot, rows=idx) == replayer.seeds(round_, slot, idx)).sum())
        passed += int((diff <= bound).sum())
    checked = len(flat)
    return {"samples": checked, "max_abs_diff": max_diff, "mean_abs_diff": sum_diff / checked,
            "top1_agreement": agree / checked, "seeds_match": seeds_ok / checked, "within_tolerance": passed / checked,
            "ok": passed == checked and seeds_ok == checked}


@torch.no_grad()
def _teacher_logits(teacher: nn.Module, replayer: ViewReplayer, key: tuple[int, str], images: torch.Tensor,
                    indices: torch.Tensor, precision: str) -> torch.Tensor:
    """Teacher logits (float32, on CPU) for the views `key` x `indices` of uint8 `images`
    (or of `CropLoader`'s {slot: crops})."""
    device = next(teacher.parameters()).device
    indices = indices.to(device)
    images = {k: v.to(device) for k, v in images.items()} if isinstance(images, dict) else images.to(device)
    views = replayer(*key, images, indices)
    with autocast(device, precision):
        return teacher(to_model_input(views)).float().cpu()
