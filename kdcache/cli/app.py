"""Top-level typer app. Each command group lives in its own module and registers here.

Commands stay thin: parse options, call the library, print. Errors the user can fix
are `KdcacheError`s; `main` turns them into one line on stderr and exit status 1.
"""

import sys

import typer

import kdcache
from kdcache.errors import KdcacheError

app = typer.Typer(
    help="kdcache: run the teacher once over seeded augmented views, cache its logits, distil many students.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kdcache {kdcache.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """kdcache: run the teacher once over seeded augmented views, cache its logits, distil many students."""


def _register_commands() -> None:
    # Imported for their side effect of adding commands to `app`.
    from kdcache.cli import commands  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `kdcache` console script."""
    _register_commands()
    try:
        app(args=argv, standalone_mode=True)
    except KdcacheError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)
