"""Stage 2's training loop, read top to bottom: the job, one step, one epoch, fit, run dirs.

Several (student, loss) jobs can share one pass: per batch the replayer regenerates each
view slot once from its key (round, slot, index), the teacher (cached or online) gives
its logits once, and every job's student trains on them. Nothing in a step reads a
device value on the host: loss sums, accuracy and a non-finite count accumulate on the
device and are read when the progress bar refreshes and at the end of the epoch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from kdcache.data import DatasetMeta, make_loader
from kdcache.errors import KdcacheError, first_difference, short_json, warn_once
from kdcache.locks import FileLock
from kdcache.models import read_checkpoint, save_checkpoint
from kdcache.outputs import RUN_LOCK, check_run_out, read_run_config, remove_stale_temporaries, write_text_atomic
from kdcache.recipes import Recipe
from kdcache.replay import ViewReplayer
from kdcache.runlog import append_epoch, rewrite_run_log, start_run_log
from kdcache.runtime import (DistContext, autocast, evaluate, init_distributed, prepare_model, synchronize,
                             to_model_input)

# --compile: off (eager), on (torch.compile), cudagraphs (torch.compile with CUDA graphs).
COMPILE_MODES = {"off": None, "on": "default", "cudagraphs": "reduce-overhead"}
PROGRESS_READ_S = 1.0  # how often the progress bar reads the device-side sums


@dataclass
class TrainJob:
    """Everything `fit` needs for one (student, loss); built by `kdcache.distill.build_jobs`.

    Jobs trained in one pass share the replayer, teacher, data, device and the recipe's
    batch size, seed and epochs; each has its own run dir, optimizer and checkpoints."""

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
    compile: str = "off"  # a key of COMPILE_MODES


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD with momentum, weight decay on all parameters (the papers' recipe)."""
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def lr_at(recipe: Recipe, epoch: int) -> float:
    """Step schedule: base LR times decay_rate per milestone passed (epochs counted from 0)."""
    passed = sum(1 for m in recipe.decay_epochs() if epoch >= m)
    return recipe.lr * recipe.lr_decay_rate**passed


def forward_loss(model: nn.Module, loss, views: list[torch.Tensor], teacher_logits, labels: torch.Tensor, epoch: int):
    """Student logits of every view and the loss; returns (loss, stats, part names), where
    stats = [loss, *parts, correct predictions, non-finite loss] stays on the device."""
    student_logits = [model(v).float() for v in views]
    # Losses count epochs from 1, as mdistiller does (DKD's warm-up ramp depends on it).
    value, parts = loss(student_logits, teacher_logits, labels, epoch + 1)
    correct = (loss.accuracy_logits(student_logits).argmax(1) == labels).sum()
    stats = torch.stack([value.detach(), *parts.values(), correct.float(), (~torch.isfinite(value)).float()])
    return value, stats, tuple(parts)


def replay_views(replayer: ViewReplayer, slot: str, prefix: torch.Tensor, images, indices) -> torch.Tensor:
    """One slot's normalised views in the student's memory format."""
    return to_model_input(replayer.views(slot, prefix, images, indices))


def compiled(fn, compile_mode: str):
    """`fn` under torch.compile in the --compile mode, or `fn` itself when it is off.

    The step's two parts go through it: `replay_views` (one graph serves every round and
    batch) and `forward_loss` (its backward compiled with it by AOTAutograd)."""
    mode = COMPILE_MODES[compile_mode]
    return fn if mode is None else torch.compile(fn, mode=mode)


class Trainee:
    """One job in training: its student (DDP-wrapped under torchrun), optimizer and the
    device-side sums of the current epoch."""

    def __init__(self, job: TrainJob, ctx: DistContext):
        self.job = job
        self.student = prepare_model(job.student, job.device)
        self.optimizer = make_optimizer(self.student, job.recipe)
        self.model: nn.Module = self.student
        if ctx.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[job.device.index] if job.device.type == "cuda" else None)
        self.forward = compiled(forward_loss, job.compile)
        self.start_epoch, self.best_top1, self.history = 0, -1.0, []
        self.sums: torch.Tensor | None = None
        self.part_names: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.job.student_name}/{self.job.loss.name}"

    def begin_epoch(self, epoch: int) -> None:
        lr = lr_at(self.job.recipe, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.sums = None

    def step(self, views: dict[str, torch.Tensor], teacher_logits: dict[str, torch.Tensor] | None,
             labels: torch.Tensor, epoch: int) -> None:
        """One SGD step on the shared views; no host sync."""
        slots = self.job.loss.views
        with autocast(self.job.device, self.job.recipe.precision):
            value, stats, self.part_names = self.forward(
                self.model, self.job.loss, [views[s] for s in slots],
                None if self.job.teacher is None else [teacher_logits[s] for s in slots], labels, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        value.backward()
        self.optimizer.step()
        self.sums = stats.double() if self.sums is None else self.sums + stats.double()

    def read(self, epoch: int, ctx: DistContext | None = None) -> dict[str, float]:
        """The epoch's sums so far (summed over ranks when `ctx` is given): one host sync.

        A non-finite loss anywhere in them stops training, naming the epoch."""
        sums = self.sums
        if ctx is not None and ctx.world_size > 1:
            sums = sums.clone()
            dist.all_reduce(sums)
        values = dict(zip(("loss", *self.part_names, "correct", "nonfinite"), sums.tolist()))
        if values["nonfinite"]:
            raise KdcacheError(f"{self.name}: the loss became nan or inf at epoch {epoch + 1}; lower --lr "
                               "or check the teacher/store")
        return values


def fit(job: TrainJob, resume: bool = False) -> list[dict[str, Any]]:
    """Train `job.student` for `job.recipe.epochs` epochs; returns the metrics of every epoch.

    Writes `config.json`, `metrics.jsonl`, `last.pth` and `best.pth` to `job.run_dir`. With
    `resume`, continues from `last.pth`.
    """
    return fit_jobs([job], resume)[0]


def fit_jobs(jobs: list[TrainJob], resume: bool = False) -> list[list[dict[str, Any]]]:
    """Train every job in one pass over the data (see the module docstring); returns each
    job's metrics. Each job's weights equal those of training it alone with the same seed."""
    first = jobs[0]
    _check_shared(jobs)
    recipe, device = first.recipe, first.device
    ctx = init_distributed(device)
    loader = make_loader(first.data_dir, "train", recipe.batch_size, shuffle=True, seed=recipe.seed,
                         backend=first.backend, device=device, drop_last=True, rank=ctx.rank, world_size=ctx.world_size,
                         replayer=first.replayer)
    if len(loader) == 0:
        raise KdcacheError(f"batch size {recipe.batch_size} is larger than the training split; lower --batch-size")
    for job in jobs:
        check_run_out(Path(job.run_dir))
        if resume and not Path(job.run_dir).is_dir():
            raise KdcacheError(f"nothing to resume: {job.run_dir} does not exist; drop --resume to start a new run")
    locks: list[FileLock] = []
    try:
        trainees = []
        for job in jobs:
            if ctx.is_main:
                locks.append(_lock_run_dir(Path(job.run_dir)))
            trainee = Trainee(job, ctx)
            restored = _restore(Path(job.run_dir), trainee.student, trainee.optimizer, job) if resume else None
            if restored is not None:
                trainee.start_epoch, trainee.best_top1, trainee.history = restored
            elif ctx.is_main:
                _start_run_dir(Path(job.run_dir), job, resume)
            trainees.append(trainee)
        ctx.barrier()
        _train(trainees, loader, ctx)
        return [t.history for t in trainees]
    finally:
        for teacher in {id(job.teacher): job.teacher for job in jobs if job.teacher is not None}.values():
            teacher.close()
        for lock in locks:
            lock.release()


def _check_shared(jobs: list[TrainJob]) -> None:
    """Jobs in one pass must share what the pass is made of."""
    first = jobs[0]
    for job in jobs[1:]:
        for name in ("replayer", "device", "backend", "meta"):
            if getattr(job, name) is not getattr(first, name):
                raise ValueError(f"jobs trained in one pass must share one {name}")
        for name in ("batch_size", "seed", "epochs", "precision"):
            if getattr(job.recipe, name) != getattr(first.recipe, name):
                raise KdcacheError(f"students trained in one pass need the same {name}: "
                                   f"{getattr(first.recipe, name)} != {getattr(job.recipe, name)}")
    if len({id(job.teacher) for job in jobs if job.teacher is not None}) > 1:
        raise ValueError("jobs trained in one pass must share one teacher")
    run_dirs = [Path(job.run_dir).resolve() for job in jobs]
    if len(set(run_dirs)) != len(run_dirs):
        raise KdcacheError("two students of one pass would write the same run dir; give each its own --out")


def shared_teacher(trainees: list[Trainee]):
    """The one teacher of a pass (None when no job needs one)."""
    return next((t.job.teacher for t in trainees if t.job.teacher is not None), None)


def train_batch(trainees: list[Trainee], round_: int, images: torch.Tensor, labels: torch.Tensor,
                indices: torch.Tensor, epoch: int, replay=replay_views) -> None:
    """One step of every trainee on one batch: each view slot replayed once, the teacher's
    logits looked up (or computed) once, then each student's SGD step. No host sync."""
    job = trainees[0].job
    replayer, device, teacher = job.replayer, job.device, shared_teacher(trainees)
    if job.compile == "cudagraphs":  # the last step's graph outputs (views, stats) are free to overwrite
        torch.compiler.cudagraph_mark_step_begin()
    slots = dict.fromkeys(slot for t in trainees for slot in t.job.loss.views)
    views = {slot: replay(replayer, slot, replayer.key_prefix(round_, slot, device), images, indices) for slot in slots}
    teacher_logits = None
    if teacher is not None:
        with autocast(device, job.recipe.precision):
            teacher_logits = {slot: teacher.logits(round_, slot, views[slot], indices)
                              for slot in dict.fromkeys(s for t in trainees if t.job.teacher is not None
                                                        for s in t.job.loss.views)}
    for t in trainees:
        t.step(views, teacher_logits, labels, epoch)


def _train(trainees: list[Trainee], loader, ctx: DistContext) -> None:
    first = trainees[0].job
    recipe, device, teacher = first.recipe, first.device, shared_teacher(trainees)
    show = first.show_progress and ctx.is_main
    replay = compiled(replay_views, first.compile)
    compile_pending = show and first.compile != "off"  # stated in the log, so timed only when shown
    if teacher is not None:
        teacher.visit(loader.order)  # a cached teacher holds only the rows this rank visits
    for epoch in range(min(t.start_epoch for t in trainees), recipe.epochs):
        active = [t for t in trainees if t.start_epoch <= epoch]
        round_ = teacher.begin_epoch(epoch) if teacher is not None else epoch
        for t in active:
            t.begin_epoch(epoch)
        loader.set_epoch(epoch)
        loader.set_views(round_, tuple(dict.fromkeys(slot for t in active for slot in t.job.loss.views)))
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{recipe.epochs}", leave=False, disable=not show, dynamic_ncols=True)
        start = last_read = time.perf_counter()
        for batch, (images, labels, indices) in enumerate(bar, 1):
            train_batch(active, round_, images, labels, indices, epoch, replay)
            if compile_pending:  # the one sync of a compiled run, to time the compilation
                synchronize(device)
                compile_pending = False
                tqdm.write(f"compiled the training step in {time.perf_counter() - start:.1f}s (first step)")
            if show and time.perf_counter() - last_read >= PROGRESS_READ_S:
                last_read = time.perf_counter()
                bar.set_postfix_str(_progress_text(active, epoch, batch, recipe.batch_size,
                                                   batch * recipe.batch_size / (last_read - start)), refresh=False)
        bar.close()
        elapsed = time.perf_counter() - start
        for t in active:
            _end_epoch(t, epoch, round_, len(loader), elapsed, ctx, show_name=len(trainees) > 1)
        ctx.barrier()


def _progress_text(trainees: list[Trainee], epoch: int, batches: int, batch_size: int, images_per_s: float) -> str:
    """Mean loss and training accuracy so far, per job: one host read each."""
    parts = []
    for t in trainees:
        values = t.read(epoch)
        label = t.name if len(trainees) > 1 else "loss"
        parts.append(f"{label} {values['loss'] / batches:.3f} acc {100 * values['correct'] / (batches * batch_size):.1f}")
    return f"{', '.join(parts)}, {images_per_s:.0f} img/s"


def _end_epoch(t: Trainee, epoch: int, round_: int, batches: int, elapsed: float, ctx: DistContext,
               show_name: bool) -> None:
    """Read the epoch's sums once, evaluate, log and checkpoint (main rank)."""
    job = t.job
    values = t.read(epoch, ctx)
    batches *= ctx.world_size
    seen = batches * job.recipe.batch_size
    record = {"epoch": epoch + 1, "round": round_, "lr": lr_at(job.recipe, epoch),
              "train_loss": values["loss"] / batches, "train_top1": 100.0 * values["correct"] / seen,
              "train_samples": seen, "epoch_time_s": elapsed, "train_images_per_s": seen / elapsed,
              **{f"train_{k}": values[k] / batches for k in t.part_names}}
    if not ctx.is_main:
        return
    record.update({f"test_{k}": v for k, v in evaluate(t.student, job.data_dir, job.meta, job.device,
                                                        precision=job.recipe.precision,
                                                        image_size=job.replayer.image_size).items()})
    is_best = record["test_top1"] > t.best_top1
    t.best_top1 = max(t.best_top1, record["test_top1"])
    record["best_top1"] = t.best_top1
    t.history.append(record)
    _save(Path(job.run_dir), t.student, t.optimizer, job, epoch + 1, t.best_top1, t.history, is_best)
    if job.show_progress:
        tqdm.write(_format_record(record, prefix=f"{t.name} " if show_name else ""))


def _format_record(record: dict[str, Any], prefix: str = "") -> str:
    return (f"{prefix}epoch {record['epoch']}: loss {record['train_loss']:.4f}  train {record['train_top1']:.2f}%  "
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
    start_run_log(run_dir)


def _save(run_dir: Path, student: nn.Module, optimizer, job: TrainJob, epoch: int, best_top1: float,
          history: list[dict[str, Any]], is_best: bool) -> None:
    info = dict(model_name=job.student_name, num_classes=job.meta.num_classes,
                dataset_fingerprint=job.meta.fingerprint, mean=list(job.meta.mean), std=list(job.meta.std),
                epoch=epoch, best_top1=best_top1, test_top1=history[-1]["test_top1"], loss=job.loss.name,
                run_identity=run_identity(job), epochs=job.recipe.epochs)
    try:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(history[-1]) + "\n")
        append_epoch(run_dir, history[-1])
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
    rewrite_run_log(run_dir, history)
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
