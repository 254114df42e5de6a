"""Config files (issue 13): one schema for a run, flags override it, a run's config.json reproduces it."""

from __future__ import annotations

import json

import pytest
import torch

from kdcache.cli.train import _run_config
from kdcache.errors import KdcacheError
from kdcache.models import read_checkpoint
from kdcache.recipes import load_config_file

from test_hostile import run_main


def test_yaml_loss_params_reach_the_recipe_and_flags_override_key_by_key(tmp_path):
    (tmp_path / "kd.yaml").write_text("student: resnet8\nloss: kd\nloss_params: {T: 2, kd_weight: 0.8}\n"
                                      "recipe:\n  epochs: 3\n  lr: 0.1\n")
    run, recipe_for = _run_config(tmp_path / "kd.yaml", None, False, {"student": None, "loss": None},
                                  dict(epochs=None, lr=0.2), None, ["kd_weight=0.5"])
    assert run == {"student": "resnet8", "loss": "kd"}
    recipe = recipe_for(run["student"])
    assert recipe.loss_params == {"T": 2, "kd_weight": 0.5}
    assert (recipe.epochs, recipe.lr) == (3, 0.2)


@pytest.mark.parametrize("text, message", [
    ("student: resnet8\nlrr: 0.1\n", "unknown key 'lrr'"),
    ("lr: 0.1\nrecipe: {lr: 0.2}\n", "'lr' is given both"),
    ("recipe: [1]\n", "recipe must be a mapping"),
    ("loss_params: [1]\n", "loss_params must be a mapping"),
    ("student: 3\n", "student must be a string"),
    ("rounds: two\nstudent: resnet8\n", "rounds must be an integer"),
    ("epochs: 2\n", "no student given"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(KdcacheError, match=message):
        _run_config(tmp_path / "c.yaml", None, False, {}, {}, None)


def test_a_runs_config_json_reproduces_the_run_and_resume_needs_no_flags(digits_dir, tmp_path):
    first = ["train", "--model", "resnet8", "--data", str(digits_dir), "--epochs", "1", "--lr", "0.07",
             "--lr-decay-epochs", "5", "--seed", "3", "--quiet"]
    assert run_main(*first, "--out", str(tmp_path / "a"))[0] == 0
    run, values = load_config_file(tmp_path / "a" / "config.json")
    assert run["student"] == "resnet8" and values["lr"] == 0.07 and values["seed"] == 3
    code, _, err = run_main("train", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b"),
                            "--quiet")
    assert code == 0, err
    a, b = (read_checkpoint(tmp_path / name / "last.pth")["model"] for name in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Resuming reads the run's own config.json: only the longer --epochs is given.
    code, _, err = run_main("train", "--out", str(tmp_path / "a"), "--resume", "--epochs", "2", "--quiet")
    assert code == 0, err
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["recipe"]["lr"] == 0.07 and config["recipe"]["epochs"] == 2


def test_every_example_in_the_config_docs_loads(tmp_path):
    from conftest import REPO
    from kdcache.losses import get_loss
    from kdcache.recipes import make_recipe

    text = (REPO / "docs" / "configs.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    assert len(blocks) == 6
    for i, block in enumerate(blocks):
        (tmp_path / f"{i}.yaml").write_text(block)
        run, values = load_config_file(tmp_path / f"{i}.yaml")
        recipe = make_recipe(run["student"], values)
        assert get_loss(run["loss"], **recipe.loss_params).params.items() >= recipe.loss_params.items()
