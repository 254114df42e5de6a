"""`kdcache train`, `kdcache distill` and `kdcache eval`: thin wrappers over kdcache.distill."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from kdcache.cli.app import TrustCheckpointOpt, app, set_interrupt_hint
from kdcache.data import DatasetMeta
from kdcache.distill import DistillConfig, build_jobs, distill
from kdcache.engine import fit_jobs
from kdcache.runtime import evaluate, pick_device, prepare_model
from kdcache.errors import KdcacheError
from kdcache.losses import list_losses
from kdcache.models import create_model, list_models, load_weights
from kdcache.paths import default_data_dir
from kdcache.recipes import Recipe, load_config_file, make_recipe, parse_key_values

DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Dataset dir from `kdcache data prepare` (default: $KDCACHE_HOME/data/cifar100).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Run dir (config.json, metrics.jsonl, last.pth, best.pth). Default: runs/<model>-<loss>.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="Config file (YAML, or a run's config.json; see docs/configs.md); command-line values override it.")]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", help="Epochs (default 240).")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Batch size per process (default 64).")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="Base LR (default 0.05; 0.01 for MobileNetV2/ShuffleNet).")]
WdOpt = Annotated[Optional[float], typer.Option("--weight-decay", help="Weight decay (default 5e-4).")]
DecayOpt = Annotated[Optional[str], typer.Option("--lr-decay-epochs", help="Comma-separated epochs of x0.1 LR (default 150,180,210 scaled to --epochs).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed of the data order and initialisation (default 0).")]
PrecisionOpt = Annotated[Optional[str], typer.Option("--precision", help="fp32 or bf16 (autocast, CUDA only).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda when available).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last.pth.")]
BackendOpt = Annotated[str, typer.Option("--backend", help="Loader backend: auto, memory or ffcv.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bar or per-epoch lines.")]
CompileOpt = Annotated[str, typer.Option("--compile", help="auto (on for CUDA, off elsewhere), off, on (torch.compile of views, student forward/backward and loss, online teacher) or cudagraphs (on, with CUDA graphs). Same results; the first step pays the compile time, which the log states.")]


def _run_config(config: Path | None, out: Path | None, resume: bool, run_flags: dict[str, Any],
                recipe_flags: dict[str, Any], lr_decay_epochs: str | None,
                loss_param: list[str] | None = None) -> tuple[dict[str, Any], Callable[[str], Recipe]]:
    """The run's keys and its recipe for a student (defaults depend on the student):
    defaults < config file < flags. With --resume and no --config, the config file is the
    run's own config.json, so a resume needs no flags."""
    if config is None and resume and out is not None and (out / "config.json").is_file():
        config = out / "config.json"
    run, values = load_config_file(config) if config is not None else ({}, {})
    run.update({key: value for key, value in run_flags.items() if value is not None})
    for key, value in run.items():
        expected = int if key == "rounds" else str
        if value is not None and not (isinstance(value, expected) and not isinstance(value, bool)):
            raise KdcacheError(f"{key} must be {'an integer' if expected is int else 'a string'}, got {value!r}")
    if not run.get("student"):
        raise KdcacheError("no student given: pass --student (--model for train) or set student: in --config")
    try:
        decay = [int(e) for e in lr_decay_epochs.split(",")] if lr_decay_epochs else None
    except ValueError:
        raise KdcacheError(f"--lr-decay-epochs takes comma-separated epochs like 150,180,210, got '{lr_decay_epochs}'") from None
    loss_params = parse_key_values(loss_param) or None

    def recipe_for(student: str) -> Recipe:
        return make_recipe(student, values, **recipe_flags, lr_decay_epochs=decay, loss_params=loss_params)

    recipe_for(run["student"].split(",")[0])  # bad values fail before anything else
    return run, recipe_for


def _report(history: list[dict], out: Path) -> None:
    if history:
        last = history[-1]
        typer.echo(f"done: {last['epoch']} epochs, test top-1 {last['test_top1']:.2f}% (best {last['best_top1']:.2f}%) -> {out}")


@app.command("train")
def train(
    model: Annotated[Optional[str], typer.Option("--model", help=f"Model to train: {', '.join(list_models())}; or timm:ARCH, or package.module:factory (called with num_classes=N).")] = None,
    data: DataOpt = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    weight_decay: WdOpt = None,
    lr_decay_epochs: DecayOpt = None,
    seed: SeedOpt = None,
    precision: PrecisionOpt = None,
    device: DeviceOpt = None,
    resume: ResumeOpt = False,
    backend: BackendOpt = "auto",
    quiet: QuietOpt = False,
    compile_mode: CompileOpt = "auto",
) -> None:
    """Train a model from scratch with cross-entropy on weak views (how you make a teacher).

    Example: kdcache train --model resnet20 --data data/fmnist --epochs 2 --out runs/resnet20
    """
    run, recipe_for = _run_config(config, out, resume, {"student": model, "data": _str(data)},
                                  dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                                       precision=precision), lr_decay_epochs)
    set_interrupt_hint("rerun with --resume to continue the run")
    if run.get("loss", "ce") != "ce":
        raise KdcacheError(f"train trains with cross-entropy, the config says loss: {run['loss']}; use `kdcache distill`")
    out = out or Path("runs") / f"{run['student']}-ce"
    history = distill(DistillConfig(student=run["student"], loss="ce", data_dir=_data_dir(run), out=out,
                                    recipe=recipe_for(run["student"]), device=device, backend=backend,
                                    show_progress=not quiet, compile=compile_mode), resume=resume)
    _report(history, out)


@app.command("distill")
def distill_cmd(
    student: Annotated[Optional[str], typer.Option("--student", help="Student model name (see `kdcache train --help`), or several comma-separated: every (student, loss) pair trains in one pass; or student: in --config.")] = None,
    loss: Annotated[Optional[str], typer.Option("--loss", help=f"Loss: {', '.join(list_losses())} (default crld); several comma-separated, as --student.")] = None,
    store: Annotated[Optional[Path], typer.Option("--store", help="Logit store (default: the one under KDCACHE_HOME made from --data).")] = None,
    teacher_mode: Annotated[Optional[str], typer.Option("--teacher-mode", help="cached (from the store, default) or online (live teacher, the baseline).")] = None,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="Teacher model name (online mode).")] = None,
    ckpt: Annotated[Optional[Path], typer.Option("--ckpt", help="Teacher checkpoint (online mode).")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", help="Use only the store's first N rounds (epoch e uses round e mod N).")] = None,
    loss_param: Annotated[Optional[list[str]], typer.Option("--loss-param", help="Loss hyperparameter override key=value, repeatable (e.g. T=2).")] = None,
    data: DataOpt = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    weight_decay: WdOpt = None,
    lr_decay_epochs: DecayOpt = None,
    seed: SeedOpt = None,
    precision: PrecisionOpt = None,
    device: DeviceOpt = None,
    resume: ResumeOpt = False,
    backend: BackendOpt = "auto",
    quiet: QuietOpt = False,
    compile_mode: CompileOpt = "auto",
    trust_checkpoint: TrustCheckpointOpt = False,
) -> None:
    """Train a student from cached teacher logits (or a live teacher with --teacher-mode online).

    Several students and losses (--student a,b --loss kd,crld) train in one pass over the
    data: one view replay and one teacher lookup per step serve every pair; each pair has
    its own run dir --out/<student>-<loss>, checkpoints and resume, and ends with the
    weights it would have trained alone with the same seed.

    Example: kdcache distill --student resnet8x4 --loss crld --data data/cifar100 --out runs/r8x4-crld
    """
    run, recipe_for = _run_config(
        config, out, resume,
        {"student": student, "loss": loss, "store": _str(store), "teacher_mode": teacher_mode, "teacher": teacher,
         "ckpt": _str(ckpt), "rounds": rounds, "data": _str(data)},
        dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, precision=precision),
        lr_decay_epochs, loss_param)
    set_interrupt_hint("rerun with --resume to continue the run")
    students, losses = _names(run["student"], "--student"), _names(run.get("loss") or "crld", "--loss")
    # A CE run's config.json records teacher_mode "none": no teacher, so nothing to carry over.
    teacher_mode = run.get("teacher_mode") if run.get("teacher_mode") not in (None, "none") else "cached"
    pairs = [(s, loss) for s in students for loss in losses]
    if len(pairs) == 1:
        outs = [out or Path("runs") / f"{students[0]}-{losses[0]}-{teacher_mode}"]
    else:
        outs = [(out or Path("runs")) / f"{s}-{loss}" for s, loss in pairs]
    cfgs = [DistillConfig(student=s, loss=loss, data_dir=_data_dir(run), out=pair_out, recipe=recipe_for(s),
                          store=_path(run.get("store")), rounds=run.get("rounds"), teacher_mode=teacher_mode,
                          teacher=run.get("teacher"), ckpt=_path(run.get("ckpt")), device=device, backend=backend,
                          show_progress=not quiet, trust_checkpoint=trust_checkpoint, compile=compile_mode)
            for (s, loss), pair_out in zip(pairs, outs)]
    jobs = build_jobs(cfgs)
    store_rounds = jobs[0].info.get("store_rounds")
    if store_rounds is not None and cfgs[0].recipe.epochs > store_rounds:
        typer.echo(f"note: {cfgs[0].recipe.epochs} epochs > {store_rounds} rounds in the store: "
                   f"epoch e uses round e mod {store_rounds}")
    for history, pair_out in zip(fit_jobs(jobs, resume=resume), outs):
        _report(history, pair_out)


def _names(text: str, option: str) -> list[str]:
    """Comma-separated names, each once."""
    names = [name.strip() for name in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise KdcacheError(f"{option} takes comma-separated names, each once, got '{text}'")
    return names


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _path(text: str | None) -> Path | None:
    return None if text is None else Path(text)


def _data_dir(run: dict[str, Any]) -> Path:
    return Path(run["data"]) if run.get("data") else default_data_dir("cifar100")


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option("--model", help="Model name.")],
    ckpt: Annotated[Path, typer.Option("--ckpt", help="Checkpoint: kdcache, mdistiller ({'model': ...}), timm ({'state_dict': ...}), torchvision, a plain state dict or safetensors.")],
    data: DataOpt = default_data_dir("cifar100"),
    batch_size: Annotated[int, typer.Option("--batch-size", help="Evaluation batch size.")] = 256,
    device: DeviceOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    quiet: QuietOpt = False,
    trust_checkpoint: TrustCheckpointOpt = False,
) -> None:
    """Evaluate a checkpoint on the test split: top-1, top-5, loss, images/s.

    Example: kdcache eval --model resnet20 --ckpt runs/resnet20/best.pth --data data/fmnist
    """
    meta = DatasetMeta.load(data)
    dev = pick_device(device)
    net = create_model(model, meta.num_classes)
    load_weights(net, ckpt, trusted=trust_checkpoint)
    result = evaluate(prepare_model(net, dev), data, meta, dev, batch_size=batch_size, progress=not quiet)
    if json_out:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
                   f"{result['images_per_s']:.0f} img/s  ({meta.counts['test']} test images, {dev})")
