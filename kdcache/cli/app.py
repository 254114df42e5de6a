"""Top-level typer app. Each command group lives in its own module and registers here.

Commands stay thin: parse options, call the library, print. Errors the user can fix
are `KdcacheError`s; `main` turns them into one line on stderr and exit status 1, and
Ctrl-C into one line saying how to resume (`set_interrupt_hint`) and exit status 130.
"""

import functools
import os
import signal
import sys
import warnings
from typing import Annotated

import typer

import kdcache
from kdcache.errors import KdcacheError

app = typer.Typer(
    help="kdcache: run the teacher once over seeded augmented views, cache its logits, distil many students.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# Every command that loads a checkpoint takes it (precompute, verify, distill, eval).
TrustCheckpointOpt = Annotated[bool, typer.Option(
    "--trust-checkpoint", help="Unpickle a checkpoint that holds Python objects besides tensors and numpy "
    "scalars (e.g. an argparse Namespace). This can run code stored in the file: only for files you trust.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kdcache {kdcache.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """kdcache: run the teacher once over seeded augmented views, cache its logits, distil many students."""


class _Interrupted(BaseException):
    """Ctrl-C, raised instead of KeyboardInterrupt, which click turns into "Aborted!" and status 1."""


_interrupt_hint = ""


def set_interrupt_hint(hint: str) -> None:
    """What a command that can resume tells the user after Ctrl-C, e.g. "rerun with --resume"."""
    global _interrupt_hint
    _interrupt_hint = hint


def _on_sigint(main_pid: int, signum, frame):
    # Forked workers (e.g. the dataset writer's) keep Python's usual KeyboardInterrupt.
    raise _Interrupted if os.getpid() == main_pid else KeyboardInterrupt


def _register_commands() -> None:
    # Imported for their side effect of adding commands to `app`.
    from kdcache.cli import commands  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `kdcache` console script."""
    # Restored on the way out, for callers that run main in-process (tests).
    previous = signal.signal(signal.SIGINT, functools.partial(_on_sigint, os.getpid()))
    try:
        _register_commands()  # option defaults read KDCACHE_HOME, which may be wrong
        app(args=argv, standalone_mode=True)
    except KdcacheError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)
    except _Interrupted:
        # Ctrl-C can land inside a zarr call between making a coroutine and running it; the
        # "never awaited" warning that coroutine gives at exit would follow the one line.
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        typer.echo("interrupted" + (f"; {_interrupt_hint}" if _interrupt_hint else ""), err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, previous)
