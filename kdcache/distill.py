"""Stage 2: build a training job for a student from a store (cached), a live teacher
(online), or no teacher at all (`kdcache train`, cross-entropy), then run `engine.fit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcache.data import DatasetMeta
from kdcache.engine import TrainJob, fit, pick_device, prepare_model
from kdcache.errors import KdcacheError
from kdcache.losses import get_loss
from kdcache.models import create_model, file_sha256, load_teacher
from kdcache.paths import stores_root
from kdcache.recipes import Recipe
from kdcache.replay import ViewReplayer, replayer_for
from kdcache.storage import LogitStore
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


def check_store(store: LogitStore, meta: DatasetMeta, views: tuple[str, ...]) -> None:
    """The store must come from this data (pixels, labels, normalisation) and hold the views."""
    ident = store.identity
    if ident["dataset_fingerprint"] != meta.fingerprint:
        raise KdcacheError(f"store {store.path} was made from other data (fingerprint {ident['dataset_fingerprint'][:12]} "
                           f"!= {meta.fingerprint[:12]} of {meta.name}); pass the --data it was made from")
    if store.num_classes != meta.num_classes:
        raise KdcacheError(f"store {store.path} has {store.num_classes} classes, the data {meta.num_classes}")
    if list(ident["mean"]) != list(meta.mean) or list(ident["std"]) != list(meta.std):
        raise KdcacheError(f"store {store.path} normalises with other mean/std than {meta.name}'s meta.json")
    missing = [v for v in views if v not in store.views]
    if missing:
        raise KdcacheError(f"store {store.path} has views {store.views}, the loss needs {list(views)}; "
                           f"precompute with --views {','.join(views)}")


def build_job(cfg: DistillConfig) -> TrainJob:
    meta = DatasetMeta.load(cfg.data_dir)
    recipe = cfg.recipe
    loss = get_loss(cfg.loss, **recipe.loss_params)
    device = pick_device(cfg.device)
    if recipe.precision == "bf16" and device.type != "cuda":
        raise KdcacheError(f"--precision bf16 runs on CUDA only; on {device} use --precision fp32")
    torch.manual_seed(recipe.seed)  # the student's initial weights
    student = create_model(cfg.student, meta.num_classes)
    info: dict[str, Any] = {"teacher_mode": cfg.teacher_mode if loss.needs_teacher else "none"}
    store = None
    if loss.needs_teacher and (cfg.store is not None or cfg.teacher_mode == "cached"):
        store = LogitStore.open(cfg.store if cfg.store is not None else find_store(meta, loss.views))
        check_store(store, meta, loss.views)
        if cfg.rounds is not None and not 1 <= cfg.rounds <= store.rounds:
            raise KdcacheError(f"--rounds must be between 1 and the store's {store.rounds} rounds, got {cfg.rounds}")
        info.update(store=str(Path(store.path).resolve()), store_rounds=cfg.rounds or store.rounds,
                    teacher=store.identity["teacher"], store_identity=store.identity, rounds=cfg.rounds)
    elif cfg.rounds is not None:
        raise KdcacheError("--rounds selects rounds of a store; it needs a cached teacher or --store")

    # With a store, its keys: an online run then sees exactly the cached run's views.
    if store is not None:
        replayer = replayer_for(store)
    else:
        replayer = ViewReplayer.from_policy_names({v: v for v in loss.views}, recipe.seed, meta.image_shape[-1],
                                                  meta.mean, meta.std)
    if not loss.needs_teacher:
        teacher = None
    elif cfg.teacher_mode == "cached":
        if not set(store.complete_slabs()) >= {(r, v) for r in range(info["store_rounds"]) for v in loss.views}:
            raise KdcacheError(f"store {store.path} is incomplete; finish it with `kdcache precompute` (it resumes)")
        teacher = CachedTeacher(store, list(loss.views), recipe.epochs, rounds=info["store_rounds"])
    elif cfg.teacher_mode == "online":
        if cfg.teacher is None or cfg.ckpt is None:
            raise KdcacheError("--teacher-mode online needs --teacher NAME and --ckpt PATH")
        model = load_teacher(cfg.teacher, cfg.ckpt, meta.num_classes, cfg.trust_checkpoint)
        teacher = OnlineTeacher(prepare_model(model, device), rounds=info.get("store_rounds"))
        info.update(teacher=cfg.teacher, ckpt=str(cfg.ckpt), teacher_sha256=file_sha256(cfg.ckpt))
    else:
        raise KdcacheError(f"--teacher-mode must be cached or online, got '{cfg.teacher_mode}'")
    return TrainJob(student=student, student_name=cfg.student, loss=loss, replayer=replayer, teacher=teacher,
                    data_dir=Path(cfg.data_dir), meta=meta, recipe=recipe, run_dir=Path(cfg.out), device=device,
                    info=info, backend=cfg.backend, show_progress=cfg.show_progress)


def distill(cfg: DistillConfig, resume: bool = False) -> list[dict[str, Any]]:
    """Train `cfg.student` and return its per-epoch metrics (see `engine.fit`)."""
    return fit(build_job(cfg), resume=resume)
