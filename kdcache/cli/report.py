"""`kdcache report`: plots and a Markdown summary of run dirs (a thin wrapper over kdcache.report)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdcache.cli.app import app
from kdcache.report import report


@app.command("report")
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run dirs written by `kdcache train` or `kdcache distill`.")],
    out: Annotated[Path, typer.Option("--out", help="Output dir for the figures and summary.md.")] = Path("report"),
) -> None:
    """Plot training curves, accuracy vs cached rounds and cached vs online runs; write summary.md.

    curves: test top-1 of every run and one train-loss plot per loss. Runs that differ only
    in their seed are drawn as their mean with a band of one std (summary.md tabulates
    mean ± std). rounds appears when cached runs differ only in store rounds (a line joins
    runs of the same epochs and recipe); cached_vs_online when an online run has a cached
    run of the same student, loss and data. Each figure is written as PNG, SVG and PDF.

    Example: kdcache report runs/r8x4-crld-s0 runs/r8x4-crld-s1 runs/r8x4-crld-online runs/r8x4-kd --out report
    """
    for path in report(runs, out):
        typer.echo(f"wrote {path}")
