"""`kdcache report`: plots and a Markdown summary of finished or running run dirs.

Reads only what `engine.fit` writes (config.json, metrics.jsonl), so it works on runs
from any machine. Runs whose config.json differ only in the seed are one group, drawn as
their mean with a band of one standard deviation. Figures are drawn on bare `Figure`
objects (no pyplot state), which render with the Agg backend whatever the session's
default backend is; matplotlib is imported only when a figure is drawn, so the CLI
starts without it.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.errors import KdcacheError
from kdcache.outputs import check_report_out, write_atomic, write_text_atomic

CURVES = "curves"
ROUNDS = "rounds"
CACHED_VS_ONLINE = "cached_vs_online"
FORMATS = ("png", "svg", "pdf")  # PNG to look at, SVG and PDF for papers and slides
SUMMARY = "summary.md"
REPORT_FILES = tuple(f"{figure}.{fmt}" for figure in (CURVES, ROUNDS, CACHED_VS_ONLINE) for fmt in FORMATS) + (SUMMARY,)
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
    def seed(self) -> int | None:
        return self.config.get("recipe", {}).get("seed")

    @property
    def description(self) -> str:
        rounds = f", {self.rounds} round{'s' if self.rounds != 1 else ''}" if self.mode == "cached" else ""
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
        return statistics.mean(self.series("epoch_time_s"))

    @property
    def images_per_s(self) -> float:
        return statistics.mean(self.series("train_images_per_s"))


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class Group:
    """Runs that differ only in their seed (often a single run); the first stands for all."""

    runs: list[Run]
    name: str  # the runs' names, with * where they differ

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def label(self) -> str:
        spread = f"; mean ± std over seeds {self.seeds}" if len(self.runs) > 1 else ""
        return f"{self.name} ({self.first.description}{spread})"

    @property
    def seeds(self) -> str:
        return ", ".join(str(run.seed) for run in self.runs)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """Mean and std over the runs at each epoch (the runs of a group have the same epochs)."""
        per_epoch = [_mean_std(list(values)) for values in zip(*(run.series(key) for run in self.runs))]
        return [mean for mean, _ in per_epoch], [std for _, std in per_epoch]

    def stat(self, attribute: str) -> tuple[float, float]:
        """Mean and std over the runs of a Run property, e.g. "final_top1"."""
        return _mean_std([getattr(run, attribute) for run in self.runs])

    def text(self, attribute: str) -> str:
        mean, std = self.stat(attribute)
        return f"{mean:.2f} ± {std:.2f}" if len(self.runs) > 1 else f"{mean:.2f}"


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


def _config_key(run: Run, *ignored: str) -> str:
    """What the run is, as a comparable string: its config without the seed, run_identity
    (derived from the rest) and the `ignored` top-level keys, and its finished epochs."""
    config = {k: v for k, v in run.config.items() if k not in ("run_identity", *ignored)}
    config["recipe"] = {k: v for k, v in config.get("recipe", {}).items() if k != "seed"}
    return json.dumps([config, run.epochs], sort_keys=True, default=str)


def _name_pattern(names: list[str]) -> str:
    """One name for several: their common start and end around a *, e.g. kd-s0, kd-s1 -> kd-s*."""
    if len(set(names)) == 1:
        return names[0]
    prefix = os.path.commonprefix(names)
    suffix = os.path.commonprefix([name[len(prefix):][::-1] for name in names])[::-1]
    return f"{prefix}*{suffix}"


def seed_groups(runs: list[Run]) -> list[Group]:
    """Runs with the same config but the seed and the same finished epochs, in the order given.

    A run is named by its dir, or parent/dir when two runs share a dir name."""
    counts = Counter(run.path.name for run in runs)
    names = {run.path: run.path.name if counts[run.path.name] == 1 else f"{run.path.parent.name}/{run.path.name}"
             for run in runs}
    by_config: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_config[_config_key(run)].append(run)
    return [Group(members, _name_pattern([names[run.path] for run in members])) for members in by_config.values()]


def rounds_lines(groups: list[Group]) -> list[list[Group]]:
    """Cached groups that differ only in store rounds (same recipe, epochs and data), each sorted by rounds."""
    lines: dict[str, list[Group]] = defaultdict(list)
    for group in groups:
        if group.first.mode == "cached" and group.first.rounds is not None:
            lines[_config_key(group.first, "store_rounds")].append(group)
    return [sorted(line, key=lambda g: g.first.rounds) for line in lines.values()]


def cached_online_pairs(groups: list[Group]) -> list[tuple[Group, Group]]:
    """Each online group with the first cached group of the same student, loss and data."""
    def what(group: Group) -> tuple:
        return group.first.student, group.first.loss, group.first.config.get("data")

    pairs = []
    for online in (g for g in groups if g.first.mode == "online"):
        cached = [g for g in groups if g.first.mode == "cached" and what(g) == what(online)]
        if cached:
            pairs.append((cached[0], online))
    return pairs


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _plot_mean_band(ax, group: Group, key: str, **style) -> None:
    """The group's mean of `key` per epoch; with several seeds, a band of one std around it."""
    mean, std = group.series(key)
    epochs = group.first.epochs
    line, = ax.plot(epochs, mean, marker="o", markersize=3, **style)
    if len(group.runs) > 1:
        ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2, linewidth=0)


def curves_figure(groups: list[Group]):
    """Test top-1 of every group, then one train-loss axis per loss (losses differ in kind and scale)."""
    losses = list(dict.fromkeys(group.first.loss for group in groups))
    panels = 1 + len(losses)
    ncols = min(panels, 3)
    nrows = -(-panels // ncols)
    fig = _figure(4.6 * ncols, 3.8 * nrows + 0.3 * len(groups))
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.remove()
    acc_ax, loss_axes = axes[0], dict(zip(losses, axes[1:panels]))
    for i, group in enumerate(groups):
        style = dict(color=f"C{i % 10}", label=group.label)
        _plot_mean_band(acc_ax, group, "test_top1", **style)
        _plot_mean_band(loss_axes[group.first.loss], group, "train_loss", **style)
    acc_ax.set(title="Test top-1", xlabel="epoch", ylabel="test top-1 (%)")
    for loss, ax in loss_axes.items():
        ax.set(title=f"Train loss: {loss}", xlabel="epoch", ylabel=f"{loss} loss")
    for ax in axes[:panels]:
        _epoch_axis(ax)
    fig.legend(*acc_ax.get_legend_handles_labels(), loc="outside lower center", ncols=min(len(groups), 2),
               fontsize="small")
    return fig


def rounds_figure(lines: list[list[Group]]):
    """Final and best test top-1 vs cached rounds; a line joins only runs that differ in rounds alone."""
    fig = _figure(8, 5 + 0.3 * len(lines))
    ax = fig.subplots()
    for i, line in enumerate(lines):
        first = line[0].first
        name = f"{_name_pattern([g.name for g in line])} ({first.student}/{first.loss}, {first.epochs[-1]} epochs)"
        rounds = [g.first.rounds for g in line]
        for attribute, marker, linestyle in (("final_top1", "o", "-"), ("best_top1", "^", ":")):
            means, stds = zip(*(g.stat(attribute) for g in line))
            ax.errorbar(rounds, means, yerr=stds, marker=marker, linestyle=linestyle, color=f"C{i % 10}", capsize=3,
                        label=f"{name} {attribute.split('_')[0]}")
    all_rounds = sorted({g.first.rounds for line in lines for g in line})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_rounds, [str(r) for r in all_rounds])
    spread = ", mean ± std over seeds" if any(len(g.runs) > 1 for line in lines for g in line) else ""
    ax.set(title=f"Test top-1 vs cached rounds{spread}", xlabel="cached rounds in the store (log2 scale)",
           ylabel="test top-1 (%)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    return fig


def cached_vs_online_figure(pairs: list[tuple[Group, Group]]):
    """Left: cached (solid) vs online (dashed) test top-1; right: mean epoch time and speedup."""
    fig = _figure(11, 4.8 + 0.3 * len(pairs))
    curve_ax, time_ax = fig.subplots(1, 2)
    for i, (cached, online) in enumerate(pairs):
        color = f"C{i % 10}"
        _plot_mean_band(curve_ax, cached, "test_top1", color=color, label=cached.label)
        _plot_mean_band(curve_ax, online, "test_top1", color=color, linestyle="--", label=online.label)
        cached_time, cached_std = cached.stat("mean_epoch_time")
        online_time, online_std = online.stat("mean_epoch_time")
        bars = time_ax.bar([3 * i, 3 * i + 1], [cached_time, online_time], yerr=[cached_std, online_std], capsize=3,
                           color=color, edgecolor="black")
        bars[1].set_hatch("//")
        time_ax.text(3 * i + 0.5, max(cached_time + cached_std, online_time + online_std) * 1.02,
                     f"speedup {online_time / cached_time:.2f}x", ha="center", va="bottom", fontsize="small")
    curve_ax.set(title="Test top-1: cached vs online teacher", xlabel="epoch", ylabel="test top-1 (%)")
    _epoch_axis(curve_ax)
    time_ax.set_xticks([3 * i + k for i in range(len(pairs)) for k in (0, 1)],
                       [f"{group.name}\n{group.first.mode}" for pair in pairs for group in pair], fontsize="small")
    time_ax.set(title="Mean epoch time (cached speedup on top)", ylabel="seconds per epoch")
    time_ax.set_ylim(0, time_ax.get_ylim()[1] * 1.12)  # room for the speedup labels
    time_ax.grid(axis="y", alpha=0.3)
    fig.legend(*curve_ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize="small")
    return fig


def save_figure(fig, out: Path, name: str) -> list[Path]:
    """Write `fig` as name.png, name.svg and name.pdf, each atomically."""
    paths = [out / f"{name}.{fmt}" for fmt in FORMATS]
    for path, fmt in zip(paths, FORMATS):
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=fmt))
    return paths


def summary_markdown(runs: list[Run], groups: list[Group], pairs: list[tuple[Group, Group]], figures: list[str]) -> str:
    lines = ["# kdcache report", "",
             "| run | student | loss | mode | rounds | seed | epochs | best top-1 | final top-1 | mean epoch time s | "
             "img/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run.path.name} | {run.student} | {run.loss} | {run.mode} | {run.rounds or '-'} | "
                     f"{run.seed if run.seed is not None else '-'} | {run.epochs[-1]} | {run.best_top1:.2f} | "
                     f"{run.final_top1:.2f} | {run.mean_epoch_time:.2f} | {run.images_per_s:.0f} |")
    seeded = [group for group in groups if len(group.runs) > 1]
    if seeded:
        lines += ["", "## Over seeds (runs that differ only in the seed: mean ± sample std)", "",
                  "| runs | student | loss | mode | rounds | seeds | epochs | best top-1 | final top-1 | "
                  "mean epoch time s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for group in seeded:
            run = group.first
            lines.append(f"| {group.name} | {run.student} | {run.loss} | {run.mode} | {run.rounds or '-'} | "
                         f"{group.seeds} | {run.epochs[-1]} | {group.text('best_top1')} | "
                         f"{group.text('final_top1')} | {group.text('mean_epoch_time')} |")
    if pairs:
        lines += ["", "## Cached vs online teacher", "",
                  "| student | loss | cached runs | online runs | cached epoch s | online epoch s | speedup | "
                  "final top-1 cached / online |",
                  "|---|---|---|---|---|---|---|---|"]
        for cached, online in pairs:
            speedup = online.stat("mean_epoch_time")[0] / cached.stat("mean_epoch_time")[0]
            lines.append(f"| {cached.first.student} | {cached.first.loss} | {cached.name} | {online.name} | "
                         f"{cached.text('mean_epoch_time')} | {online.text('mean_epoch_time')} | {speedup:.2f}x | "
                         f"{cached.text('final_top1')} / {online.text('final_top1')} |")
    lines += ["", "## Figures", ""]
    lines += [f"- [{name}.png]({name}.png) ([SVG]({name}.svg), [PDF]({name}.pdf))" for name in figures]
    lines += ["", "Runs: " + ", ".join(f"`{run.path}`" for run in runs), ""]
    return "\n".join(lines)


def report(run_dirs: list[str | Path], out: str | Path) -> list[Path]:
    """Write curves, rounds and cached_vs_online figures (when they apply; PNG, SVG and PDF)
    and summary.md to `out`; returns the files written."""
    if not run_dirs:
        raise KdcacheError("no run dir given; pass one or more dirs written by `kdcache train` / `kdcache distill`")
    runs = [load_run(p) for p in dict.fromkeys(Path(p) for p in run_dirs)]
    out = Path(out)
    check_report_out(out, REPORT_FILES)
    groups = seed_groups(runs)
    figures = {CURVES: curves_figure(groups)}
    lines = rounds_lines(groups)
    if any(len(line) > 1 for line in lines):
        figures[ROUNDS] = rounds_figure(lines)
    pairs = cached_online_pairs(groups)
    if pairs:
        figures[CACHED_VS_ONLINE] = cached_vs_online_figure(pairs)
    written = [path for name, fig in figures.items() for path in save_figure(fig, out, name)]
    write_text_atomic(out / SUMMARY, summary_markdown(runs, groups, pairs, list(figures)))
    return [*written, out / SUMMARY]
