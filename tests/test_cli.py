"""The CLI contract (issue 2): help with an example everywhere, one-line errors, no tracebacks.

Help is checked in-process (fast); errors run the real entry point in a subprocess, so a
traceback anywhere on the way would show.
"""

from __future__ import annotations

import runpy
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

import kdcache
import kdcache.cli.commands  # noqa: F401  (registers every command)
from kdcache.cli.app import app
from kdcache.data import DatasetMeta

from conftest import REPO


def command_paths(groups: bool = True) -> list[list[str]]:
    """Every command (and, with `groups`, every group) under `kdcache`, as argument lists."""
    root = typer.main.get_command(app)
    paths = []

    def walk(cmd, path, ctx):
        for name in cmd.list_commands(ctx):
            child = cmd.get_command(ctx, name)
            is_group = hasattr(child, "list_commands")
            if groups or not is_group:
                paths.append(path + [name])
            if is_group:
                walk(child, path + [name], typer.Context(child, info_name=name, parent=ctx))

    walk(root, [], typer.Context(root, info_name="kdcache"))
    return paths


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdcache.cli", *args], capture_output=True, text=True, timeout=120)


def test_root_help_and_version():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("data", "train", "precompute", "distill", "info", "verify", "report"):
        assert name in result.stdout
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"kdcache {kdcache.__version__}"


def test_every_command_is_listed():
    names = {" ".join(p) for p in command_paths()}
    assert {"data prepare", "data info", "train", "distill", "eval", "precompute", "info", "verify",
            "views show", "report"} <= names


@pytest.mark.parametrize("path", command_paths(), ids=" ".join)
def test_help_exits_0(path):
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("path", command_paths(groups=False), ids=" ".join)
def test_command_help_has_an_example(path):
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    assert "Example" in result.output, f"`kdcache {' '.join(path)} --help` shows no example"


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    """A dataset dir with only meta.json: enough for commands that fail before reading images."""
    out = tmp_path_factory.mktemp("fake-data")
    DatasetMeta(name="fake", num_classes=10, class_names=[str(i) for i in range(10)], image_shape=[3, 16, 16],
                counts={"train": 100, "test": 20}, mean=[0.5] * 3, std=[0.25] * 3, fingerprint="0" * 64,
                source="test", preprocessing="none", image_encoding="raw", kdcache_version="test").save(out)
    return out


BAD_INPUT = {
    "unknown source": (["data", "prepare", "nosuch", "--out", "{tmp}/out"], "unknown dataset source 'nosuch'"),
    "missing data dir": (["distill", "--student", "resnet8", "--data", "{tmp}/nodata", "--out", "{tmp}/run"],
                         "nodata/meta.json"),
    "info on a non-store": (["info", "{tmp}"], "is not a kdcache logit store"),
    "unknown model": (["train", "--model", "nosuch", "--data", "{data}", "--out", "{tmp}/run"], "unknown model 'nosuch'"),
    "missing checkpoint": (["precompute", "--teacher", "resnet8", "--ckpt", "{tmp}/no.pth", "--data", "{data}",
                            "--out", "{tmp}/store"], "no.pth not found"),
    "unknown loss": (["distill", "--student", "resnet8", "--loss", "nosuch", "--data", "{data}", "--out", "{tmp}/run"],
                     "unknown loss 'nosuch'"),
    "bad decay epochs": (["train", "--model", "resnet8", "--data", "{data}", "--lr-decay-epochs", "a,b",
                          "--out", "{tmp}/run"], "--lr-decay-epochs"),
    "report on a non-run dir": (["report", "{tmp}", "--out", "{tmp}/report"], "is not a run dir"),
}


@pytest.mark.parametrize("args, message", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_error_line(args, message, tmp_path, fake_data):
    result = run_cli(*(a.format(tmp=tmp_path, data=fake_data) for a in args))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


def test_usage_errors_exit_nonzero_without_traceback():
    result = run_cli("distill")  # --student is required
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert "--student" in result.stderr


def test_cli_docs_are_up_to_date():
    render = runpy.run_path(str(REPO / "scripts" / "gen_cli_docs.py"))["render"]
    assert (REPO / "docs" / "cli.md").read_text() == render(), \
        "docs/cli.md is stale: run .venv/bin/python scripts/gen_cli_docs.py"
