"""The training loop shared by `kdcache train` (CE, no teacher) and `kdcache distill`.

One epoch: the loader yields uint8 images with their sample indices; for each view slot
the loss needs, the replayer regenerates that view from its key (round, slot, index); the
teacher (cached or online) gives its logits for the same views; the loss combines them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kdcache.augment import get_policy, normalize
from kdcache.data import DatasetMeta, make_loader
from kdcache.errors import KdcacheError, first_difference, short_json, warn_once
from kdcache.locks import FileLock
from kdcache.models import read_checkpoint, save_checkpoint
from kdcache.outputs import RUN_LOCK, check_run_out, read_run_config, remove_stale_temporaries, write_text_atomic
from kdcache.recipes import Recipe
from kdcache.replay import ViewReplayer


@dataclass
class DistContext:
    """Rank and world size under torchrun (WORLD_SIZE > 1), else a single process."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group if there is one (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size())


def pick_device(name: str | None) -> torch.device:
    """`cuda` when available unless told otherwise; the local rank's GPU under torchrun."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise KdcacheError(f"--device {name!r} is not a device kdcache trains on; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KdcacheError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise KdcacheError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                               f"numbered 0..{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(device)
    return device


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked; fp32 everywhere else."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_model_input(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def lr_at(recipe: Recipe, epoch: int) -> float:
    """Step schedule: base LR times decay_rate per milestone passed (epochs counted from 0)."""
    passed = sum(1 for m in recipe.decay_epochs() if epoch >= m)
    return recipe.lr * recipe.lr_decay_rate**passed


@torch.no_grad()
def evaluate(model: nn.Module, data_dir: Path, meta: DatasetMeta, device: torch.device, batch_size: int = 256,
             precision: str = "fp32") -> dict[str, float]:
    """Top-1, top-5 and CE loss of `model` on the un-augmented, normalised test split."""
    was_training = model.training
    model.eval()
    identity = get_policy("identity", meta.image_shape[-1])
    loader = make_loader(data_dir, "test", batch_size, shuffle=False, device=device)
    correct1 = correct5 = 0
    loss_sum = 0.0
    seen = 0
    start = time.perf_counter()
    for images, labels, indices in loader:
        x = normalize(identity(images, indices), meta.mean, meta.std)
        with autocast(device, precision):
            logits = model(to_model_input(x)).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        seen += labels.numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    model.train(was_training)
    return {
        "top1": 100.0 * correct1 / seen,
        "top5": 100.0 * correct5 / seen,
        "loss": loss_sum / seen,
        "images_per_s": seen / elapsed,
    }


@dataclass
class TrainJob:
    """Everything `fit` needs; built by `kdcache.distill.build_job` or `kdcache train`."""

    student: nn.Module
    student_name: str
    loss: Any  # a kdcache.losses.DistillLoss
    replayer: ViewReplayer
    teacher: Any  # CachedTeacher | OnlineTeacher | None
    data_dir: Path
    meta: DatasetMeta
    recipe: Recipe
    run_dir: Path
    device: torch.device
    info: dict[str, Any] = field(default_factory=dict)  # recorded in checkpoints and config.json
    backend: str = "auto"
    show_progress: bool = True


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD with momentum, weight decay on all parameters (the papers' recipe)."""
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def fit(job: TrainJob, resume: bool = False) -> list[dict[str, Any]]:
    """Train `job.student` for `job.recipe.epochs` epochs; returns the metrics of every epoch.

    Writes `config.json`, `metrics.jsonl`, `last.pth` and `best.pth` to `job.run_dir`. With
    `resume`, continues from `last.pth`.
    """
    recipe, device = job.recipe, job.device
    ctx = init_distributed(device)
    student = prepare_model(job.student, device)
    optimizer = make_optimizer(student, recipe)
    loader = make_loader(job.data_dir, "train", recipe.batch_size, shuffle=True, seed=recipe.seed, backend=job.backend,
                         device=device, drop_last=True, rank=ctx.rank, world_size=ctx.world_size)
    if len(loader) == 0:
        raise KdcacheError(f"batch size {recipe.batch_size} is larger than the training split; lower --batch-size")
    run_dir = Path(job.run_dir)
    check_run_out(run_dir)
    if resume and not run_dir.is_dir():
        raise KdcacheError(f"nothing to resume: {run_dir} does not exist; drop --resume to start a new run")
    lock = _lock_run_dir(run_dir) if ctx.is_main else None
    try:
        start_epoch, best_top1, history = 0, -1.0, []
        restored = _restore(run_dir, student, optimizer, job) if resume else None
        if restored is not None:
            start_epoch, best_top1, history = restored
        elif ctx.is_main:
            _start_run_dir(run_dir, job, resume)
        ctx.barrier()
        return _train(job, student, optimizer, loader, ctx, run_dir, start_epoch, best_top1, history)
    finally:
        if lock is not None:
            lock.release()


def _train(job: TrainJob, student: nn.Module, optimizer, loader, ctx: DistContext, run_dir: Path,
           start_epoch: int, best_top1: float, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    recipe, device = job.recipe, job.device
    train_model: nn.Module = student
    if ctx.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    try:
        for epoch in range(start_epoch, recipe.epochs):
            round_ = job.teacher.begin_epoch(epoch) if job.teacher is not None else epoch
            lr = lr_at(recipe, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loader.set_epoch(epoch)
            train_model.train()
            stats = _EpochStats()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{recipe.epochs}", leave=False, mininterval=1.0,
                       disable=not (job.show_progress and ctx.is_main), dynamic_ncols=True)
            for images, labels, indices in bar:
                loss_value, parts, correct = train_step(job, train_model, optimizer, round_, images, labels, indices, epoch)
                stats.add(loss_value, parts, correct, labels.numel())
                bar.set_postfix(loss=f"{stats.mean_loss:.3f}", acc=f"{stats.accuracy:.1f}", img_s=f"{stats.rate:.0f}",
                                refresh=False)
            bar.close()
            record = {"epoch": epoch + 1, "round": round_, "lr": lr, **stats.summary(ctx)}
            if ctx.is_main:
                record.update({f"test_{k}": v for k, v in evaluate(student, job.data_dir, job.meta, device,
                                                                    precision=recipe.precision).items()})
                is_best = record["test_top1"] > best_top1
                best_top1 = max(best_top1, record["test_top1"])
                record["best_top1"] = best_top1
                history.append(record)
                _save(run_dir, student, optimizer, job, epoch + 1, best_top1, history, is_best)
                if job.show_progress:
                    tqdm.write(_format_record(record))
            ctx.barrier()
    finally:
        if job.teacher is not None:
            job.teacher.close()
    return history


def train_step(job: TrainJob, model: nn.Module, optimizer, round_: int, images, labels, indices, epoch: int):
    """One optimisation step on a batch: replay each view, student and teacher logits, loss, SGD.

    Returns (loss value, loss parts, number of correct training predictions).
    """
    student_logits, teacher_logits = [], []
    with autocast(job.device, job.recipe.precision):
        for slot in job.loss.views:
            views = to_model_input(job.replayer(round_, slot, images, indices))
            student_logits.append(model(views).float())
            if job.teacher is not None:
                teacher_logits.append(job.teacher.logits(round_, slot, views, indices))
    # Losses count epochs from 1, as mdistiller does (DKD's warm-up ramp depends on it).
    loss, parts = job.loss(student_logits, teacher_logits if job.teacher is not None else None, labels, epoch + 1)
    if not torch.isfinite(loss):
        raise KdcacheError(f"loss became {loss.item()} at epoch {epoch + 1}; lower --lr or check the teacher/store")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = (job.loss.accuracy_logits(student_logits).argmax(1) == labels).sum().item()
    return loss.item(), parts, correct


class _EpochStats:
    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.parts: dict[str, float] = {}
        self.correct = 0
        self.seen = 0
        self.batches = 0
        self.start = time.perf_counter()

    def add(self, loss: float, parts: dict[str, float], correct: int, n: int) -> None:
        self.loss_sum += loss
        for key, value in parts.items():
            self.parts[key] = self.parts.get(key, 0.0) + float(value)
        self.correct += correct
        self.seen += n
        self.batches += 1

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.batches, 1)

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / max(self.seen, 1)

    @property
    def rate(self) -> float:
        return self.seen / max(time.perf_counter() - self.start, 1e-9)

    def summary(self, ctx: DistContext) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        totals = torch.tensor([self.loss_sum, self.correct, self.seen, self.batches], dtype=torch.float64)
        if ctx.world_size > 1:
            dist.all_reduce(totals)
        loss_sum, correct, seen, batches = totals.tolist()
        out = {"train_loss": loss_sum / max(batches, 1), "train_top1": 100.0 * correct / max(seen, 1),
               "train_samples": int(seen),
               "epoch_time_s": elapsed, "train_images_per_s": seen / max(elapsed, 1e-9)}
        out.update({f"train_{k}": v / max(self.batches, 1) for k, v in self.parts.items()})
        return out


def _format_record(record: dict[str, Any]) -> str:
    return (f"epoch {record['epoch']}: loss {record['train_loss']:.4f}  train {record['train_top1']:.2f}%  "
            f"test {record['test_top1']:.2f}% (best {record['best_top1']:.2f}%)  "
            f"{record['train_images_per_s']:.0f} img/s  {record['epoch_time_s']:.1f}s")


def run_identity(job: TrainJob) -> dict[str, Any]:
    """What a run is: a resume must match it field for field (epochs may only grow).

    The LR milestones are compared as resolved, so extending --epochs is allowed only when
    the schedule does not move (explicit --lr-decay-epochs)."""
    # The loss's resolved parameters stand for recipe.loss_params (its overrides only).
    recipe = {k: v for k, v in job.recipe.to_dict().items() if k not in ("epochs", "lr_decay_epochs", "loss_params")}
    return json.loads(json.dumps({
        "student": job.student_name, "loss": job.loss.name, "loss_params": job.loss.params,
        "recipe": {**recipe, "lr_milestones": job.recipe.decay_epochs()},
        "dataset_fingerprint": job.meta.fingerprint,
        **{key: job.info.get(key) for key in ("teacher_mode", "teacher", "teacher_sha256", "store", "store_rounds", "store_identity")},
    }, default=str))


def _lock_run_dir(run_dir: Path) -> FileLock:
    """Create the run dir and hold its lock: a second process on the same --out stops at once."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KdcacheError(f"cannot create run dir {run_dir} ({err.strerror}); choose a writable --out") from None
    lock = FileLock(run_dir / RUN_LOCK)
    if not lock.try_acquire():
        raise KdcacheError(f"run dir {run_dir} is in use by another kdcache process (pid {lock.holder()}); "
                           "wait for it to finish or choose another --out")
    remove_stale_temporaries(run_dir, ".*.pth.*.tmp")  # checkpoint writes a kill interrupted
    return lock


def _start_run_dir(run_dir: Path, job: TrainJob, resume: bool) -> None:
    if (run_dir / "last.pth").exists():
        raise KdcacheError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if resume:
        warn_once(f"{run_dir} has no last.pth yet (the run stopped before its first checkpoint): starting it from epoch 1")
    config = {"student": job.student_name, "loss": job.loss.name, "loss_params": job.loss.params,
              "recipe": job.recipe.to_dict(), "data": str(job.data_dir), **job.info, "run_identity": run_identity(job)}
    write_text_atomic(run_dir / "config.json", json.dumps(config, indent=2, default=str) + "\n")
    write_text_atomic(run_dir / "metrics.jsonl", "")


def _save(run_dir: Path, student: nn.Module, optimizer, job: TrainJob, epoch: int, best_top1: float,
          history: list[dict[str, Any]], is_best: bool) -> None:
    info = dict(model_name=job.student_name, num_classes=job.meta.num_classes,
                dataset_fingerprint=job.meta.fingerprint, mean=list(job.meta.mean), std=list(job.meta.std),
                epoch=epoch, best_top1=best_top1, test_top1=history[-1]["test_top1"], loss=job.loss.name,
                run_identity=run_identity(job), epochs=job.recipe.epochs)
    try:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(history[-1]) + "\n")
        if is_best:
            save_checkpoint(run_dir / "best.pth", student, **info)
        save_checkpoint(run_dir / "last.pth", student, optimizer=optimizer.state_dict(), history=history, **info)
    except OSError as err:
        raise KdcacheError(f"cannot write the checkpoint of epoch {epoch} to {run_dir} ({err.strerror}); "
                           "free some space, then rerun with --resume") from None


def _restore(run_dir: Path, student: nn.Module, optimizer, job: TrainJob):
    """(start epoch, best top-1, history) from last.pth; None when the run dir has none yet."""
    path = run_dir / "last.pth"
    if not path.exists():
        if read_run_config(run_dir) is None:
            raise KdcacheError(f"nothing to resume: {path} does not exist; drop --resume to start a new run")
        return None
    ckpt = read_checkpoint(path)
    _check_same_run(ckpt, job, run_dir)
    student.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    history = list(ckpt.get("history", []))
    # metrics.jsonl may hold epochs after the last checkpoint (a crash between the two writes).
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    if job.recipe.epochs != ckpt.get("epochs", job.recipe.epochs):
        config = read_run_config(run_dir) or {}
        config.setdefault("epochs_extended", []).append({"at_epoch": int(ckpt["epoch"]), "from": ckpt["epochs"],
                                                         "to": job.recipe.epochs})
        config["recipe"] = {**config.get("recipe", {}), "epochs": job.recipe.epochs}
        write_text_atomic(run_dir / "config.json", json.dumps(config, indent=2, default=str) + "\n")
    best = max((r["test_top1"] for r in history), default=-1.0)
    return int(ckpt["epoch"]), best, history


def _check_same_run(ckpt: dict[str, Any], job: TrainJob, run_dir: Path) -> None:
    """Refuse to resume a run with anything changed but a longer --epochs (one line naming the field)."""
    current = run_identity(job)
    # Checkpoints of kdcache 0.1 record only the student, loss and data.
    stored = ckpt.get("run_identity") or {"student": ckpt.get("model_name"), "loss": ckpt.get("loss"),
                                          "dataset_fingerprint": ckpt.get("dataset_fingerprint")}
    diff = first_difference(stored, {k: current.get(k) for k in stored}, "")
    if diff:
        name, old, new = diff
        raise KdcacheError(f"cannot resume {run_dir}: it was made with {name}={short_json(old)}, this command has "
                           f"{name}={short_json(new)}; resume with the run's values (see its config.json) "
                           "or start a new run with another --out")
    done, planned = int(ckpt["epoch"]), ckpt.get("epochs", job.recipe.epochs)
    if job.recipe.epochs < planned:
        raise KdcacheError(f"cannot resume {run_dir} with --epochs {job.recipe.epochs}: the run was planned for "
                           f"{planned} epochs ({done} done); --epochs may only grow")
