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
    out: Annotated[Path, typer.Option("--out", help="Output dir for the PNGs and summary.md.")] = Path("report"),
) -> None:
    """Plot training curves, accuracy vs cached rounds and cached vs online runs; write summary.md.

    rounds.png appears when the cached runs differ in store rounds; cached_vs_online.png
    when an online run has a cached run of the same student, loss and data.

    Example: kdcache report runs/r8x4-crld runs/r8x4-crld-online runs/r8x4-kd --out report
    """
    for path in report(runs, out):
        typer.echo(f"wrote {path}")
