"""Write docs/cli.md from the typer app, so the CLI reference cannot drift from the code.

Usage: .venv/bin/python scripts/gen_cli_docs.py   (tests/test_cli.py checks the file is current)
"""

from __future__ import annotations

import inspect
from pathlib import Path

import typer

import kdcache.cli.commands  # noqa: F401  (registers every command on the app)
from kdcache.cli.app import app
from kdcache.paths import home

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
HEADER = """# CLI reference

Generated from the typer app by `scripts/gen_cli_docs.py`; do not edit by hand (a test
checks that this file matches the code). Defaults under your kdcache home are shown as
`$KDCACHE_HOME` (`~/.cache/kdcache` unless set). Run any command with `--help` for the
same text in the terminal.
"""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(param) -> str:
    """The default as the user sees it; paths under the kdcache home machine-independent."""
    if param.required:
        return "required"
    value = param.default
    if value is None or (param.multiple and not value):
        return "-"
    if getattr(param, "is_flag", False):
        return "on" if value else "off"
    return f"`{str(value).replace(str(home()), '$KDCACHE_HOME')}`"


def _help_text(cmd) -> str:
    """The docstring, with its `Example: ...` line as a code block."""
    lines = []
    for line in inspect.cleandoc(cmd.help or "").splitlines():
        if line.startswith("Example: "):
            lines += ["Example:", "", "```", line[len("Example: "):], "```"]
        else:
            lines.append(line)
    return "\n".join(lines)


def _params_table(cmd, ctx: typer.Context) -> list[str]:
    """One row per argument and option (typer >= 0.29 parameters: `display_type`)."""
    rows = []
    for param in cmd.params:
        if param.hidden:
            continue
        kind = param.display_type(ctx).strip("<>")
        if param.param_type_name == "option":
            name = ", ".join(f"`{o}`" for o in param.opts + param.secondary_opts)
            kind = "flag" if param.is_flag else kind
        else:
            name = f"`{param.name.upper()}{'...' if param.nargs == -1 else ''}` (argument)"
        if param.multiple:
            kind += ", repeatable"
        rows.append(f"| {name} | {kind} | {_default(param)} | {_cell(getattr(param, 'help', None) or '')} |")
    if not rows:
        return []
    return ["| argument / option | type | default | description |", "|---|---|---|---|", *rows, ""]


def _usage(cmd) -> str:
    pieces = ["[OPTIONS]"]
    for param in cmd.params:
        if param.param_type_name == "argument":
            piece = param.name.upper() + ("..." if param.nargs == -1 else "")
            pieces.append(piece if param.required else f"[{piece}]")
    if hasattr(cmd, "list_commands"):
        pieces.append("COMMAND [ARGS]...")
    return " ".join(pieces)


def _sections(cmd, path: list[str], ctx: typer.Context) -> list[str]:
    name = " ".join(path)
    out = [f"{'#' * min(len(path) + 1, 4)} `{name}`", ""]
    out += [f"Usage: `{name} {_usage(cmd)}`", "", _help_text(cmd), "", *_params_table(cmd, ctx)]
    if hasattr(cmd, "list_commands"):
        for sub in sorted(cmd.list_commands(ctx)):
            child = cmd.get_command(ctx, sub)
            out += _sections(child, path + [sub], typer.Context(child, info_name=sub, parent=ctx))
    return out


def render() -> str:
    root = typer.main.get_command(app)
    ctx = typer.Context(root, info_name="kdcache")
    return HEADER + "\n" + "\n".join(_sections(root, ["kdcache"], ctx)).rstrip() + "\n"


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC}")
