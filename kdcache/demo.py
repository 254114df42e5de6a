"""`kdcache demo`: the whole story end to end on data every machine here has.

Fashion-MNIST (Debian's package, padded to 32x32) -> a teacher trained with CE (reused by
later demo runs) -> one store of weak + strong views -> students distilled with crld, cmkd
and kd from that store, one online crld run and a student-only CE baseline, each trained
with several seeds -> a table and one line reading it: is a difference larger than the
seed-to-seed spread, or noise?
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from kdcache.data import DatasetMeta, prepare_dataset
from kdcache.distill import DistillConfig, distill
from kdcache.errors import KdcacheError
from kdcache.runtime import pick_device
from kdcache.models import read_checkpoint
from kdcache.precompute import PrecomputeConfig, precompute
from kdcache.recipes import make_recipe


@dataclass(frozen=True)
class DemoPlan:
    name: str
    max_train: int | None  # None: the whole training split
    max_test: int | None
    teacher: str
    student: str
    teacher_epochs: int
    student_epochs: int  # also the store's rounds: one round per student epoch
    batch_size: int = 64
    lr: float = 0.05
    teacher_lr: float = 0.1
    precision: str = "fp32"
    seeds: int = 1  # each student trains once per seed 0..seeds-1; the spread needs several


# Sized on the 2-core CPU machine (docs/experiments.md): quick is a smoke run; default trains the
# teacher long enough (15 epochs, about 89.6%) to be worth distilling from, once, and each student
# with 3 seeds so that the reading can tell a gain from seed noise; full is for a GPU.
PLANS = {
    "quick": DemoPlan("quick", 2000, 1000, "resnet20", "resnet8", teacher_epochs=2, student_epochs=2),
    "default": DemoPlan("default", 8000, 2000, "resnet20", "resnet8", teacher_epochs=15, student_epochs=4, seeds=3),
    "full": DemoPlan("full", None, None, "resnet32x4", "resnet8x4", teacher_epochs=240, student_epochs=240,
                     teacher_lr=0.05, precision="bf16"),
}

# (run name, loss, teacher mode) of the students every demo trains.
STUDENTS = [("ce", "ce", "none"), ("kd", "kd", "cached"), ("cmkd", "cmkd", "cached"),
            ("crld", "crld", "cached"), ("crld-online", "crld", "online")]


def prepare_demo_data(plan: DemoPlan, workdir: Path, echo: Callable[[str], None]) -> Path:
    """Fashion-MNIST padded to 32x32, cut to the plan's size; prepared once per plan."""
    data_dir = workdir / f"fashion-mnist-{plan.max_train or 'all'}"
    if not (data_dir / "meta.json").exists():
        echo(f"[1/4] preparing Fashion-MNIST ({plan.max_train or 'all'} train / {plan.max_test or 'all'} test, 32x32)")
        prepare_dataset("fashion-mnist", data_dir, size=32, max_train=plan.max_train, max_test=plan.max_test)
    else:
        echo(f"[1/4] reusing data {data_dir}")
    return data_dir


def train_or_reuse_teacher(plan: DemoPlan, data_dir: Path, workdir: Path, device: str | None,
                           echo: Callable[[str], None]) -> tuple[Path, float]:
    """Train the teacher unless an earlier demo finished one for the same data and plan."""
    meta = DatasetMeta.load(data_dir)
    run_dir = workdir / f"teacher-{plan.teacher}-{meta.fingerprint[:12]}-{plan.teacher_epochs}ep"
    ckpt = run_dir / "last.pth"
    if ckpt.exists() and read_checkpoint(ckpt)["epoch"] == plan.teacher_epochs:
        echo(f"[2/4] reusing teacher {ckpt}")
    else:
        echo(f"[2/4] training teacher {plan.teacher} for {plan.teacher_epochs} epochs")
        recipe = make_recipe(plan.teacher, epochs=plan.teacher_epochs, batch_size=plan.batch_size, lr=plan.teacher_lr,
                             precision=plan.precision)
        distill(DistillConfig(student=plan.teacher, loss="ce", data_dir=data_dir, out=run_dir, recipe=recipe,
                              device=device), resume=ckpt.exists())
    return ckpt, float(read_checkpoint(ckpt)["test_top1"])


def demo_inputs(plan: DemoPlan, workdir: Path, device: str | None = None, data_dir: Path | None = None,
                echo: Callable[[str], None] = print) -> tuple[Path, Path, float, Any]:
    """(data dir, teacher checkpoint, teacher top-1, store) of a plan: each made once per workdir."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir) if data_dir is not None else prepare_demo_data(plan, workdir, echo)
    teacher_ckpt, teacher_top1 = train_or_reuse_teacher(plan, data_dir, workdir, device, echo)
    echo(f"[3/4] precomputing {plan.student_epochs} rounds x (weak, strong) of teacher logits")
    store = precompute(PrecomputeConfig(teacher=plan.teacher, ckpt=teacher_ckpt, data_dir=data_dir,
                                        views={"weak": "weak", "strong": "strong"}, rounds=plan.student_epochs,
                                        out=workdir / f"store-{teacher_ckpt.parent.name}-{plan.student_epochs}r",
                                        precision=plan.precision, device=device))
    return data_dir, teacher_ckpt, teacher_top1, store


def train_student(plan: DemoPlan, student: tuple[str, str, str], seed: int, data_dir: Path, teacher_ckpt: Path,
                  store_path: Path, runs_dir: Path, device: str | None = None) -> dict[str, Any]:
    """Train one (run name, loss, teacher mode) of STUDENTS with one seed, from scratch."""
    name, loss, mode = student
    out = runs_dir / f"{name}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    recipe = make_recipe(plan.student, epochs=plan.student_epochs, batch_size=plan.batch_size, lr=plan.lr,
                         precision=plan.precision, seed=seed)
    history = distill(DistillConfig(student=plan.student, loss=loss, data_dir=data_dir, out=out, recipe=recipe,
                                    store=store_path if mode != "none" else None,
                                    teacher_mode=mode if mode != "none" else "cached",
                                    teacher=plan.teacher, ckpt=teacher_ckpt, device=device))
    return {"seed": seed, "test_top1": history[-1]["test_top1"], "best_top1": history[-1]["best_top1"],
            "epoch_time_s": sum(r["epoch_time_s"] for r in history) / len(history), "run_dir": str(out)}


def run_demo(plan: DemoPlan, workdir: Path, device: str | None = None, data_dir: Path | None = None,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns (and writes to workdir/<plan>/summary.json) the table's numbers."""
    start = time.perf_counter()
    data_dir, teacher_ckpt, teacher_top1, store = demo_inputs(plan, workdir, device, data_dir, echo)
    store_info = store.info()

    runs_dir = Path(workdir) / f"runs-{plan.name}"
    rows = []
    for i, (name, loss, mode) in enumerate(STUDENTS, 1):
        runs = []
        for seed in range(plan.seeds):
            echo(f"[4/4] student {i}/{len(STUDENTS)}, seed {seed + 1}/{plan.seeds}: {plan.student} with {loss}"
                 + (f" ({mode} teacher)" if mode != "none" else " (no teacher)"))
            runs.append(train_student(plan, (name, loss, mode), seed, data_dir, teacher_ckpt, store.path, runs_dir,
                                      device))
        rows.append({"run": name, "loss": loss, "teacher": mode, **mean_std([r["test_top1"] for r in runs], "test_top1"),
                     "best_top1": statistics.fmean(r["best_top1"] for r in runs),
                     "epoch_time_s": statistics.fmean(r["epoch_time_s"] for r in runs), "seeds": runs})
    by_name = {r["run"]: r for r in rows}
    summary = {
        "plan": asdict(plan),
        "device": str(pick_device(device)),
        "data": str(data_dir),
        "teacher": {"model": plan.teacher, "checkpoint": str(teacher_ckpt), "test_top1": teacher_top1},
        "store": {"path": str(store.path), "size_on_disk_bytes": store_info["size_on_disk_bytes"],
                  "bytes_per_view_sample": store_info["bytes_per_view_sample"],
                  "slabs": store_info["complete_slabs"]},
        "students": rows,
        "crld_cached_vs_online_speedup": by_name["crld-online"]["epoch_time_s"] / by_name["crld"]["epoch_time_s"],
        "total_time_s": time.perf_counter() - start,
    }
    summary["reading"] = reading(summary)
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def mean_std(values: list[float], key: str) -> dict[str, float | None]:
    """`key` (the mean over seeds) and `key_std` (sample std; None for one seed: no spread)."""
    return {key: statistics.fmean(values), f"{key}_std": statistics.stdev(values) if len(values) > 1 else None}


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float | None, str]:
    """(a - b in final top-1 points, their seed spread, verdict). The spread is the sum of
    the two students' seed std: a gap beyond it means their mean ± std ranges do not overlap."""
    gap = a["test_top1"] - b["test_top1"]
    if a["test_top1_std"] is None or b["test_top1_std"] is None:
        return gap, None, "unknown"
    spread = a["test_top1_std"] + b["test_top1_std"]
    return gap, spread, "within" if abs(gap) <= spread else "beyond"


def reading(summary: dict[str, Any]) -> str:
    """The table's one-line conclusion, computed from its numbers: the cached speedup, whether
    cached and online CRLD agree within the seed spread, and which losses beat CE beyond it."""
    by_name = {r["run"]: r for r in summary["students"]}
    speed = f"cached CRLD {summary['crld_cached_vs_online_speedup']:.2f}x faster per epoch than online"
    gap, spread, verdict = compare(by_name["crld"], by_name["crld-online"])
    if verdict == "unknown":
        return (f"reading: {speed}; one seed per student measures no spread, so no accuracy difference here "
                "can be told from noise (run with --seeds 3)")
    agree = f"cached vs online CRLD {gap:+.2f} points, {verdict} the seed spread ({spread:.2f})"
    gains = {r["run"]: compare(r, by_name["ce"]) for r in summary["students"] if r["teacher"] == "cached"}
    beat = [name for name, (gain, _, verdict) in gains.items() if verdict == "beyond" and gain > 0]
    below = [name for name, (gain, _, verdict) in gains.items() if verdict == "beyond" and gain < 0]
    kd = f"{', '.join(beat)} beat CE beyond the spread" if beat else "no loss beat CE beyond the spread"
    kd += (f", {', '.join(below)} fell below it" if below else "") + " (gain vs spread: "
    kd += ", ".join(f"{name} {gain:+.2f} vs {spread:.2f}" for name, (gain, spread, _) in gains.items()) + ")"
    return f"reading: {speed}; {agree}; {kd}"


def format_summary(summary: dict[str, Any]) -> str:
    """The demo's closing table (final top-1 as mean ± std over seeds) and its reading."""
    plan, teacher, store = summary["plan"], summary["teacher"], summary["store"]
    seeds = f"{plan['seeds']} seed" + ("s" if plan["seeds"] > 1 else "")
    lines = [
        f"kdcache demo ({plan['name']}) on {summary['device']}, data {summary['data']}",
        f"teacher {teacher['model']}: test top-1 {teacher['test_top1']:.2f}%",
        f"store: {store['slabs']} slabs, {store['size_on_disk_bytes'] / 2**20:.1f} MiB on disk, "
        f"{store['bytes_per_view_sample']} bytes per view-sample",
        "",
        f"{'student ' + plan['student']:<20}{'teacher':>8}{'final top-1 (' + seeds + ')':>24}"
        f"{'best top-1':>12}{'s/epoch':>10}",
    ]
    for r in summary["students"]:
        final = f"{r['test_top1']:.2f}%" + (f" ± {r['test_top1_std']:.2f}" if r["test_top1_std"] is not None else "")
        lines.append(f"{r['run']:<20}{r['teacher']:>8}{final:>24}{r['best_top1']:>11.2f}%{r['epoch_time_s']:>10.1f}")
    lines += ["", summary["reading"], f"total {summary['total_time_s'] / 60:.1f} min"]
    return "\n".join(lines)


def plan_for(quick: bool, full: bool, seeds: int | None = None) -> DemoPlan:
    """The chosen plan, with `seeds` (when given) replacing the plan's number of seeds."""
    if seeds is not None and seeds < 1:
        raise KdcacheError(f"--seeds must be at least 1, got {seeds}")
    plan = PLANS["quick"] if quick else PLANS["full"] if full else PLANS["default"]
    return plan if seeds is None else replace(plan, seeds=seeds)

