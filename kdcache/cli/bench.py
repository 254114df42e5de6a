"""`kdcache bench`: throughput of the training modes, precompute and store sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdcache.bench import BenchConfig, format_table, run_bench, save_result
from kdcache.cli.app import app
from kdcache.errors import KdcacheError


@app.command("bench")
def bench_cmd(
    teacher: Annotated[str, typer.Option("--teacher", help="Teacher model.")] = "resnet32x4",
    student: Annotated[str, typer.Option("--student", help="Student model.")] = "resnet8x4",
    samples: Annotated[int, typer.Option("--samples", help="Synthetic training samples (one slab per view).")] = 1024,
    steps: Annotated[int, typer.Option("--steps", help="Timed training steps per mode.")] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training batch size.")] = 64,
    precision: Annotated[str, typer.Option("--precision", help="fp32 or bf16 (CUDA).")] = "fp32",
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda when available).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Where to save the JSON result.")] = Path("runs/bench.json"),
) -> None:
    """Measure steps/s of student-only CE, cached and online CRLD and KD, precompute vs plain
    inference, and bytes per view-sample of each encoding, in one run on one device.

    Example: kdcache bench --steps 20 --device cuda --out runs/bench-h100.json
    """
    if out.is_dir():
        raise KdcacheError(f"--out {out} is a directory; give a file name such as runs/bench.json")
    cfg = BenchConfig(teacher=teacher, student=student, samples=samples, steps=steps, batch_size=batch_size,
                      precision=precision, device=device)
    result = run_bench(cfg, echo=typer.echo)
    typer.echo("")
    typer.echo(format_table(result))
    save_result(result, out)
    typer.echo(f"\nsaved {out}")
