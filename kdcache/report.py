"""`kdcache report`: plots and a Markdown summary of finished or running run dirs.

Reads only what `engine.fit` writes (config.json, metrics.jsonl), so it works on runs
from any machine. Figures are drawn on bare `Figure` objects (no pyplot state), which
render with the Agg backend whatever the session's default backend is.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from kdcache.errors import KdcacheError
from kdcache.outputs import check_report_out, write_atomic, write_text_atomic

CURVES = "curves.png"
ROUNDS = "rounds.png"
CACHED_VS_ONLINE = "cached_vs_online.png"
SUMMARY = "summary.md"
REPORT_FILES = (CURVES, ROUNDS, CACHED_VS_ONLINE, SUMMARY)
CONFIG_KEYS = ("student", "loss")
METRIC_KEYS = ("epoch", "train_loss", "epoch_time_s", "train_images_per_s", "test_top1")


@dataclass
class Run:
    """One run dir: its config.json and its per-epoch metrics."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def student(self) -> str:
        return self.config["student"]

    @property
    def loss(self) -> str:
        return self.config["loss"]

    @property
    def mode(self) -> str:
        return self.config.get("teacher_mode", "none")

    @property
    def rounds(self) -> int | None:
        return self.config.get("store_rounds")

    @property
    def label(self) -> str:
        rounds = f" ({self.rounds} round{'s' if self.rounds != 1 else ''})" if self.mode == "cached" else ""
        return f"{self.student}/{self.loss}/{self.mode}{rounds}"

    def series(self, key: str) -> list[float]:
        return [m[key] for m in self.metrics]

    @property
    def epochs(self) -> list[int]:
        return self.series("epoch")

    @property
    def best_top1(self) -> float:
        return max(self.series("test_top1"))

    @property
    def final_top1(self) -> float:
        return self.metrics[-1]["test_top1"]

    @property
    def mean_epoch_time(self) -> float:
        return _mean(self.series("epoch_time_s"))

    @property
    def images_per_s(self) -> float:
        return _mean(self.series("train_images_per_s"))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def load_run(path: str | Path) -> Run:
    """Read a run dir written by `kdcache train` / `kdcache distill`."""
    path = Path(path)
    config_file, metrics_file = path / "config.json", path / "metrics.jsonl"
    if not config_file.is_file() or not metrics_file.is_file():
        raise KdcacheError(f"{path} is not a run dir (no config.json and metrics.jsonl); "
                           "pass dirs written by `kdcache train` or `kdcache distill`")
    try:
        config = json.loads(config_file.read_text())
        metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    except ValueError as err:
        raise KdcacheError(f"{path} holds a corrupt config.json or metrics.jsonl ({err})") from None
    if not all(isinstance(r, dict) for r in [config, *metrics]):
        raise KdcacheError(f"{path} holds a corrupt config.json or metrics.jsonl (not JSON objects)")
    missing = sorted({k for k in CONFIG_KEYS if k not in config} | {k for m in metrics for k in METRIC_KEYS if k not in m})
    if missing:
        raise KdcacheError(f"{path}: config.json or metrics.jsonl lack {', '.join(missing)}; is it a kdcache run dir?")
    if not metrics:
        raise KdcacheError(f"{path} has no finished epoch yet; wait for its first epoch or leave it out")
    return Run(path, config, metrics)


def cached_online_pairs(runs: list[Run]) -> list[tuple[Run, Run]]:
    """Each online run with the first cached run of the same student, loss and data."""
    pairs = []
    for online in (r for r in runs if r.mode == "online"):
        cached = [r for r in runs if r.mode == "cached" and
                  (r.student, r.loss, r.config.get("data")) == (online.student, online.loss, online.config.get("data"))]
        if cached:
            pairs.append((cached[0], online))
    return pairs


def _unique_labels(runs: list[Run]) -> dict[Path, str]:
    """Legend labels; runs that would share one get their dir name appended."""
    counts = Counter(run.label for run in runs)
    return {run.path: run.label if counts[run.label] == 1 else f"{run.label} [{run.path.name}]" for run in runs}


def _epoch_axis(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_curves(runs: list[Run], out: Path) -> None:
    """Test top-1 and train loss vs epoch, one line per run, legend below the axes."""
    labels = _unique_labels(runs)
    fig = Figure(figsize=(11, 4.8 + 0.25 * len(runs)), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    for run in runs:
        acc_ax.plot(run.epochs, run.series("test_top1"), marker="o", markersize=3, label=labels[run.path])
        loss_ax.plot(run.epochs, run.series("train_loss"), marker="o", markersize=3)
    acc_ax.set(title="Test top-1", xlabel="epoch", ylabel="test top-1 (%)")
    loss_ax.set(title="Train loss (each run's own loss)", xlabel="epoch", ylabel="train loss")
    if all(v > 0 for run in runs for v in run.series("train_loss")):
        loss_ax.set_yscale("log")  # losses of different kinds differ in scale
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        loss_ax.yaxis.set_major_formatter(plain)
        loss_ax.yaxis.set_minor_formatter(plain)
    for ax in (acc_ax, loss_ax):
        _epoch_axis(ax)
    fig.legend(loc="outside lower center", ncols=min(len(runs), 3), fontsize="small")
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def plot_rounds(runs: list[Run], out: Path) -> None:
    """Final and best test top-1 vs cached rounds, one line per student/loss (runs with
    the same rounds are averaged)."""
    groups: dict[tuple[str, str], dict[int, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[(run.student, run.loss)][run.rounds].append(run)
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    all_rounds = sorted({run.rounds for run in runs})
    for (student, loss), by_rounds in sorted(groups.items()):
        xs = sorted(by_rounds)
        final = [_mean([r.final_top1 for r in by_rounds[x]]) for x in xs]
        best = [_mean([r.best_top1 for r in by_rounds[x]]) for x in xs]
        line, = ax.plot(xs, final, marker="o", label=f"{student}/{loss} final")
        ax.plot(xs, best, marker="^", linestyle=":", color=line.get_color(), label=f"{student}/{loss} best")
    epochs = sorted({run.epochs[-1] for run in runs})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_rounds, [str(r) for r in all_rounds])
    ax.set(title=f"Test top-1 vs cached rounds ({', '.join(map(str, epochs))} epochs)",
           xlabel="cached rounds in the store (log2 scale)", ylabel="test top-1 (%)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right center", fontsize="small")
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def plot_cached_vs_online(pairs: list[tuple[Run, Run]], out: Path) -> None:
    """Left: cached (solid) vs online (dashed) test top-1; right: mean epoch time and speedup."""
    fig = Figure(figsize=(11, 4.8 + 0.25 * len(pairs)), layout="constrained")
    curve_ax, time_ax = fig.subplots(1, 2)
    names = []
    for i, (cached, online) in enumerate(pairs):
        name = f"{cached.student}/{cached.loss}"
        names.append(name)
        line, = curve_ax.plot(cached.epochs, cached.series("test_top1"), marker="o", markersize=3,
                              label=f"{name} cached")
        curve_ax.plot(online.epochs, online.series("test_top1"), marker="s", markersize=3, linestyle="--",
                      color=line.get_color(), label=f"{name} online")
        times = [cached.mean_epoch_time, online.mean_epoch_time]
        bars = time_ax.bar([3 * i, 3 * i + 1], times, color=[line.get_color()] * 2, edgecolor="black")
        bars[1].set_hatch("//")
        time_ax.text(3 * i + 0.5, max(times) * 1.02, f"speedup {online.mean_epoch_time / cached.mean_epoch_time:.2f}x",
                     ha="center", va="bottom", fontsize="small")
    curve_ax.set(title="Test top-1: cached vs online teacher", xlabel="epoch", ylabel="test top-1 (%)")
    _epoch_axis(curve_ax)
    time_ax.set_xticks([3 * i + k for i in range(len(pairs)) for k in (0, 1)],
                       [f"{n}\ncached" if k == 0 else f"{n}\nonline" for n in names for k in (0, 1)],
                       fontsize="small")
    time_ax.set(title="Mean epoch time (cached speedup on top)", ylabel="seconds per epoch")
    time_ax.set_ylim(0, time_ax.get_ylim()[1] * 1.12)  # room for the speedup labels
    time_ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(2 * len(pairs), 4), fontsize="small")
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def summary_markdown(runs: list[Run], pairs: list[tuple[Run, Run]], figures: list[str]) -> str:
    lines = ["# kdcache report", "",
             "| run | student | loss | mode | rounds | epochs | best top-1 | final top-1 | mean epoch time s | img/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run.path.name} | {run.student} | {run.loss} | {run.mode} | {run.rounds or '-'} | "
                     f"{run.epochs[-1]} | {run.best_top1:.2f} | {run.final_top1:.2f} | "
                     f"{run.mean_epoch_time:.2f} | {run.images_per_s:.0f} |")
    if pairs:
        lines += ["", "## Cached vs online teacher", "",
                  "| student | loss | cached run | online run | cached epoch s | online epoch s | speedup | "
                  "final top-1 cached / online |",
                  "|---|---|---|---|---|---|---|---|"]
        for cached, online in pairs:
            lines.append(f"| {cached.student} | {cached.loss} | {cached.path.name} | {online.path.name} | "
                         f"{cached.mean_epoch_time:.2f} | {online.mean_epoch_time:.2f} | "
                         f"{online.mean_epoch_time / cached.mean_epoch_time:.2f}x | "
                         f"{cached.final_top1:.2f} / {online.final_top1:.2f} |")
    lines += ["", "## Figures", ""] + [f"- [{name}]({name})" for name in figures]
    lines += ["", "Runs: " + ", ".join(f"`{run.path}`" for run in runs), ""]
    return "\n".join(lines)


def report(run_dirs: list[str | Path], out: str | Path) -> list[Path]:
    """Write curves.png, rounds.png and cached_vs_online.png (when they apply) and
    summary.md to `out`; returns the files written."""
    if not run_dirs:
        raise KdcacheError("no run dir given; pass one or more dirs written by `kdcache train` / `kdcache distill`")
    runs = [load_run(p) for p in dict.fromkeys(Path(p) for p in run_dirs)]
    out = Path(out)
    check_report_out(out, REPORT_FILES)
    figures = [CURVES]
    plot_curves(runs, out / CURVES)
    cached = [r for r in runs if r.mode == "cached" and r.rounds is not None]
    if len({r.rounds for r in cached}) > 1:
        plot_rounds(cached, out / ROUNDS)
        figures.append(ROUNDS)
    pairs = cached_online_pairs(runs)
    if pairs:
        plot_cached_vs_online(pairs, out / CACHED_VS_ONLINE)
        figures.append(CACHED_VS_ONLINE)
    write_text_atomic(out / SUMMARY, summary_markdown(runs, pairs, figures))
    return [out / name for name in figures + [SUMMARY]]
