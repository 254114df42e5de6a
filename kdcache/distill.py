"""Stage 2: build training jobs for students from a store (cached), a live teacher
(online), or no teacher at all (`kdcache train`, cross-entropy), then run `engine.fit_jobs`.

Several (student, loss) pairs share one pass: one loader, one replayer, one teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcache.data import DatasetMeta
from kdcache.engine import COMPILE_MODES, TrainJob, compiled, fit_jobs
from kdcache.runtime import pick_device, prepare_model
from kdcache.errors import KdcacheError
from kdcache.losses import get_loss
from kdcache.models import create_model, file_sha256, load_teacher
from kdcache.paths import stores_root
from kdcache.recipes import Recipe
from kdcache.replay import DEFAULT_VIEWS, ViewReplayer, check_store, replayer_for, view_size
from kdcache.storage import LogitStore, warn_if_loss_needs_full_logits
from kdcache.teachers import CachedTeacher, OnlineTeacher


@dataclass
class DistillConfig:
    student: str
    loss: str
    data_dir: Path
    out: Path
    recipe: Recipe
    store: Path | None = None  # None: find the one store under KDCACHE_HOME made from this data
    rounds: int | None = None  # use only the store's first N rounds (None: all of them)
    teacher_mode: str = "cached"  # cached | online
    teacher: str | None = None  # online mode
    ckpt: Path | None = None  # online mode
    trust_checkpoint: bool = False  # online mode: unpickle a teacher file holding arbitrary Python objects
    device: str | None = None
    backend: str = "auto"
    show_progress: bool = True
    compile: str = "auto"  # auto (on for CUDA, off elsewhere) | off | on | cudagraphs (see engine.COMPILE_MODES)


def find_store(meta: DatasetMeta, views: tuple[str, ...]) -> Path:
    """The single store under KDCACHE_HOME made from this dataset with the views a loss needs."""
    root = stores_root()
    matches = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            store = LogitStore.open(path)
        except KdcacheError:
            continue
        if store.identity["dataset_fingerprint"] == meta.fingerprint and set(views) <= set(store.views):
            matches.append(path)
    if not matches:
        raise KdcacheError(f"no store in {root} was made from {meta.name} with views {list(views)}; "
                           "run `kdcache precompute` first or pass --store")
    if len(matches) > 1:
        raise KdcacheError(f"several stores in {root} fit {meta.name}: {', '.join(p.name for p in matches)}; "
                           "choose one with --store")
    return matches[0]


def build_job(cfg: DistillConfig) -> TrainJob:
    """The training job of one (student, loss)."""
    return build_jobs([cfg])[0]


_SHARED_FIELDS = ("data_dir", "store", "rounds", "teacher_mode", "teacher", "ckpt", "trust_checkpoint", "device",
                  "backend", "show_progress", "compile")


def build_jobs(cfgs: list[DistillConfig]) -> list[TrainJob]:
    """One job per config, sharing one replayer and one teacher: the configs may differ
    only in student, loss, recipe and out (see `engine.fit_jobs` for what recipes share)."""
    cfg = cfgs[0]
    for other in cfgs[1:]:
        for name in _SHARED_FIELDS:
            if getattr(other, name) != getattr(cfg, name):
                raise KdcacheError(f"students trained in one pass need the same {name}")
    if cfg.compile != "auto" and cfg.compile not in COMPILE_MODES:
        raise KdcacheError(f"--compile must be auto or one of {', '.join(COMPILE_MODES)}, got '{cfg.compile}'")
    meta = DatasetMeta.load(cfg.data_dir)
    losses = [get_loss(c.loss, **c.recipe.loss_params) for c in cfgs]
    views = tuple(dict.fromkeys(v for loss in losses for v in loss.views))
    needs_teacher = any(loss.needs_teacher for loss in losses)
    device = pick_device(cfg.device)
    # Compiled is twice eager's speed on an H100 (docs/benchmarks.md); a CPU would pay the compile for little.
    compile_mode = ("on" if device.type == "cuda" else "off") if cfg.compile == "auto" else cfg.compile
    if cfg.recipe.precision == "bf16" and device.type != "cuda":
        raise KdcacheError(f"--precision bf16 runs on CUDA only; on {device} use --precision fp32")
    info: dict[str, Any] = {"teacher_mode": cfg.teacher_mode if needs_teacher else "none"}
    store = None
    if needs_teacher and (cfg.store is not None or cfg.teacher_mode == "cached"):
        store = LogitStore.open(cfg.store if cfg.store is not None else find_store(meta, views))
        check_store(store, meta, views)
        if cfg.rounds is not None and not 1 <= cfg.rounds <= store.rounds:
            raise KdcacheError(f"--rounds must be between 1 and the store's {store.rounds} rounds, got {cfg.rounds}")
        for loss in losses if cfg.teacher_mode == "cached" else ():
            warn_if_loss_needs_full_logits(loss, store.encoding)
        info.update(store=str(Path(store.path).resolve()), store_rounds=cfg.rounds or store.rounds,
                    teacher=store.identity["teacher"], store_identity=store.identity, rounds=cfg.rounds)
    elif cfg.rounds is not None:
        raise KdcacheError("--rounds selects rounds of a store; it needs a cached teacher or --store")

    # With a store, its keys: an online run then sees exactly the cached run's views.
    if store is not None:
        replayer = replayer_for(store)
    else:
        # Images of their own sizes take the ImageNet policies of the loss's slots.
        policies = {v: f"imagenet_{v}" if meta.own_size and v in DEFAULT_VIEWS else v for v in views}
        replayer = ViewReplayer.from_policy_names(policies, cfg.recipe.seed, view_size(meta), meta.mean, meta.std)
    teacher = _make_teacher(cfg, store, views, info, meta, device, compile_mode) if needs_teacher else None
    jobs = []
    for c, loss in zip(cfgs, losses):
        torch.manual_seed(c.recipe.seed)  # the student's initial weights, as when trained alone
        student = create_model(c.student, meta.num_classes)
        job_info = dict(info) if loss.needs_teacher else {"teacher_mode": "none"}
        jobs.append(TrainJob(student=student, student_name=c.student, loss=loss, replayer=replayer,
                             teacher=teacher if loss.needs_teacher else None, data_dir=Path(cfg.data_dir), meta=meta,
                             recipe=c.recipe, run_dir=Path(c.out), device=device, info=job_info,
                             backend=cfg.backend, show_progress=cfg.show_progress, compile=compile_mode))
    return jobs


def _make_teacher(cfg: DistillConfig, store: LogitStore | None, views: tuple[str, ...], info: dict[str, Any],
                  meta: DatasetMeta, device: torch.device, compile_mode: str):
    if cfg.teacher_mode == "cached":
        if not set(store.complete_slabs()) >= {(r, v) for r in range(info["store_rounds"]) for v in views}:
            raise KdcacheError(f"store {store.path} is incomplete; finish it with `kdcache precompute` (it resumes)")
        return CachedTeacher(store, list(views), cfg.recipe.epochs, rounds=info["store_rounds"], device=device)
    if cfg.teacher_mode == "online":
        if cfg.teacher is None or cfg.ckpt is None:
            raise KdcacheError("--teacher-mode online needs --teacher NAME and --ckpt PATH")
        model = load_teacher(cfg.teacher, cfg.ckpt, meta.num_classes, cfg.trust_checkpoint)
        info.update(teacher=cfg.teacher, ckpt=str(cfg.ckpt), teacher_sha256=file_sha256(cfg.ckpt))
        # Compiled as the student's step is: the baseline the cache is measured against runs at its best.
        return OnlineTeacher(compiled(prepare_model(model, device), compile_mode), rounds=info.get("store_rounds"))
    raise KdcacheError(f"--teacher-mode must be cached or online, got '{cfg.teacher_mode}'")


def distill(cfg: DistillConfig | list[DistillConfig], resume: bool = False):
    """Train `cfg.student` and return its per-epoch metrics (see `engine.fit`); given a
    list of configs, train them in one pass and return the metrics of each."""
    if isinstance(cfg, DistillConfig):
        return fit_jobs(build_jobs([cfg]), resume=resume)[0]
    return fit_jobs(build_jobs(cfg), resume=resume)
