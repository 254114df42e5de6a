"""The kdcache command line (a thin typer layer over the library)."""

from kdcache.cli.app import app, main

__all__ = ["app", "main"]
