"""Stage 1: run the teacher over every (round, view) slab of the training set and store
its logits; and `verify`, which recomputes a sample of stored views and compares.

A slab is the unit of work: one writer computes it whole and marks it complete, so a
restarted run redoes only incomplete slabs, and under torchrun slab k belongs to rank
k mod world_size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from kdcache.data import DatasetMeta, load_split, make_loader
from kdcache.engine import autocast, evaluate, init_distributed, pick_device, prepare_model, to_model_input
from kdcache.errors import KdcacheError
from kdcache.models import create_model, file_sha256, load_weights
from kdcache.paths import default_store_path
from kdcache.replay import ViewReplayer
from kdcache.storage import LogitStore, measure_encoding


@dataclass
class PrecomputeConfig:
    teacher: str
    ckpt: Path
    data_dir: Path
    views: dict[str, str]  # slot -> policy name
    rounds: int
    out: Path | None = None  # None: the content-addressed default under KDCACHE_HOME
    encoding: str = "float16"
    seed: int = 0
    batch_size: int | None = None  # None: 256 on CPU (larger batches measured 2x slower there), 1024 on CUDA
    precision: str = "fp32"
    device: str | None = None
    overwrite: bool = False
    backend: str = "auto"


def load_teacher(name: str, ckpt: Path, num_classes: int) -> nn.Module:
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise KdcacheError(f"teacher checkpoint {ckpt} not found; pass --ckpt PATH (or train one with `kdcache train`)")
    model = create_model(name, num_classes)
    load_weights(model, ckpt)
    return model.eval()


def store_identity(cfg: PrecomputeConfig, meta: DatasetMeta, ckpt_sha256: str) -> dict[str, Any]:
    """What must match for two runs to share a store (rounds may grow, so they are not part of it)."""
    replayer = ViewReplayer.from_policy_names(cfg.views, cfg.seed, meta.image_shape[-1], meta.mean, meta.std)
    return {
        "teacher": cfg.teacher,
        "teacher_sha256": ckpt_sha256,
        "dataset_fingerprint": meta.fingerprint,
        "image_size": meta.image_shape[-1],
        "mean": list(meta.mean),
        "std": list(meta.std),
        "policies": replayer.slot_specs,
        "store_seed": cfg.seed,
        "encoding": cfg.encoding,
    }


def replayer_for(store: LogitStore) -> ViewReplayer:
    ident = store.identity
    return ViewReplayer(ident["policies"], ident["store_seed"], ident["mean"], ident["std"])


def precompute(cfg: PrecomputeConfig, progress: bool = True) -> LogitStore:
    """Fill the store for `cfg`, computing only slabs not yet complete; returns the store."""
    if cfg.rounds < 1:
        raise KdcacheError("--rounds must be at least 1")
    device = pick_device(cfg.device)
    ctx = init_distributed(device)
    meta = DatasetMeta.load(cfg.data_dir)
    teacher = prepare_model(load_teacher(cfg.teacher, cfg.ckpt, meta.num_classes), device)
    identity = store_identity(cfg, meta, file_sha256(cfg.ckpt))
    path = Path(cfg.out) if cfg.out is not None else default_store_path(identity)
    if ctx.is_main:
        attrs = {}
        if cfg.overwrite or "teacher_test_top1" not in _existing_attrs(path):
            acc = evaluate(teacher, cfg.data_dir, meta, device, precision=cfg.precision)
            attrs = {"teacher_test_top1": acc["top1"], "teacher_test_top5": acc["top5"]}
        store = LogitStore.create(path, identity=identity, num_samples=meta.counts["train"],
                                  num_classes=meta.num_classes, rounds=cfg.rounds, views=list(cfg.views),
                                  encoding=cfg.encoding, attrs=attrs, overwrite=cfg.overwrite)
    ctx.barrier()
    if not ctx.is_main:
        store = LogitStore.open(path, mode="r+")

    all_slabs = [(r, slot) for r in range(cfg.rounds) for slot in cfg.views]
    todo = [key for key in all_slabs[ctx.rank::ctx.world_size] if not store.is_complete(*key)]
    replayer = replayer_for(store)
    batch_size = cfg.batch_size or (1024 if device.type == "cuda" else 256)
    loader = make_loader(cfg.data_dir, "train", batch_size, shuffle=False, device=device, backend=cfg.backend)
    bar = tqdm(total=len(todo), desc=f"precompute {path.name}", unit="slab", disable=not (progress and ctx.is_main),
               dynamic_ncols=True)
    for round_, slot in todo:
        elapsed = compute_slab(store, teacher, replayer, loader, round_, slot, meta, cfg.precision)
        bar.update(1)
        bar.set_postfix(img_s=f"{meta.counts['train'] / elapsed:.0f}", round=round_, view=slot)
    bar.close()
    ctx.barrier()
    return store


def compute_slab(store: LogitStore, teacher: nn.Module, replayer: ViewReplayer, loader, round_: int, slot: str,
                 meta: DatasetMeta, precision: str) -> float:
    """Compute, encode and write one slab (then mark it complete); returns the seconds it took."""
    start = time.perf_counter()
    logits, seeds, correct = run_teacher_on_slab(teacher, replayer, loader, round_, slot, meta, precision)
    compute_s = time.perf_counter() - start
    encoding_error = measure_encoding(logits, store.encoding)
    store.write_slab(round_, slot, logits, seeds, stats={
        "teacher_top1": 100.0 * correct / meta.counts["train"],
        "images_per_s": meta.counts["train"] / compute_s,
        **{k: encoding_error[k] for k in ("max_abs_error", "mean_kl_t1", "mean_kl_t4")},
    })
    return time.perf_counter() - start


@torch.no_grad()
def run_teacher_on_slab(teacher: nn.Module, replayer: ViewReplayer, loader, round_: int, slot: str,
                        meta: DatasetMeta, precision: str):
    """The teacher's float32 logits [N, C] on every view of one slab, with the view seeds."""
    n = meta.counts["train"]
    logits = torch.empty(n, meta.num_classes, dtype=torch.float32)
    seeds = torch.empty(n, dtype=torch.int64)
    device = next(teacher.parameters()).device
    correct = 0
    for images, labels, indices in loader:
        views = to_model_input(replayer(round_, slot, images, indices))
        with autocast(device, precision):
            out = teacher(views).float()
        correct += (out.argmax(1) == labels).sum().item()
        cpu_idx = indices.cpu()
        logits[cpu_idx] = out.cpu()
        seeds[cpu_idx] = replayer.seeds(round_, slot, indices).cpu()
    return logits, seeds, correct


def verify(store_path: Path, ckpt: Path, data_dir: Path, samples: int = 512, tolerance: float = 1e-3,
           device: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Recompute the teacher on `samples` random stored views and compare with the store.

    A view passes when |stored - recomputed| <= (the slab's recorded encoding error) + tolerance
    and its seed equals the one the store recorded.
    """
    store = LogitStore.open(store_path)
    ident = store.identity
    meta = DatasetMeta.load(data_dir)
    if meta.fingerprint != ident["dataset_fingerprint"]:
        raise KdcacheError(f"{data_dir} is not the dataset this store was made from (fingerprint differs)")
    sha = file_sha256(ckpt)
    if sha != ident["teacher_sha256"]:
        raise KdcacheError(f"{ckpt} is not the checkpoint this store was made from (sha256 differs)")
    complete = store.complete_slabs()
    if not complete:
        raise KdcacheError(f"{store_path} has no complete slab to verify; run precompute first")
    dev = pick_device(device)
    teacher = prepare_model(load_teacher(ident["teacher"], ckpt, store.num_classes), dev)
    replayer = replayer_for(store)
    images = load_split(data_dir, "train")[0].to(dev)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(complete), (samples,), generator=gen)
    max_diff = sum_diff = 0.0
    agree = seeds_ok = passed = checked = 0
    for slab_i in picks.unique().tolist():
        round_, slot = complete[slab_i]
        count = int((picks == slab_i).sum())
        idx = torch.randperm(store.num_samples, generator=gen)[:count]
        stored = store.slab(round_, slot)[idx]
        bound = store.slab_stats(round_, slot).get("max_abs_error", 0.0) + tolerance
        dev_idx = idx.to(dev)
        with torch.no_grad(), autocast(dev, "fp32"):
            fresh = teacher(to_model_input(replayer(round_, slot, images[dev_idx], dev_idx))).float().cpu()
        diff = (stored - fresh).abs().amax(dim=1)
        max_diff = max(max_diff, float(diff.max()))
        sum_diff += float((stored - fresh).abs().mean(dim=1).sum())
        agree += int((stored.argmax(1) == fresh.argmax(1)).sum())
        seeds_ok += int((store.seeds(round_, slot)[idx] == replayer.seeds(round_, slot, idx)).sum())
        passed += int((diff <= bound).sum())
        checked += count
    return {"samples": checked, "max_abs_diff": max_diff, "mean_abs_diff": sum_diff / checked,
            "top1_agreement": agree / checked, "seeds_match": seeds_ok / checked, "within_tolerance": passed / checked,
            "ok": passed == checked and seeds_ok == checked}


def _existing_attrs(path: Path) -> dict[str, Any]:
    """Free-form attributes of the store at `path`, or {} when there is none yet."""
    try:
        return LogitStore.open(path).attrs
    except KdcacheError:
        return {}
