"""Training recipes and run config files.

Precedence, lowest first: the defaults below, per-student defaults (LR 0.01 for
ShuffleNet and MobileNetV2 students, as the papers train them), a config file (YAML; a
run's own config.json is one), explicit command-line values. The file format is
documented in docs/configs.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdcache.errors import KdcacheError

# Students the papers train with LR 0.01 instead of 0.05.
LOW_LR_STUDENTS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}


@dataclass
class Recipe:
    """Everything that shapes a training run besides the model, data and loss."""

    epochs: int = 240
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Epochs at which LR is multiplied by lr_decay_rate. None: 150/180/210 of 240,
    # scaled to the run's length (so a short run keeps the same shape).
    lr_decay_epochs: list[int] | None = None
    lr_decay_rate: float = 0.1
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast on CUDA)
    channels_last: bool = True
    loss_params: dict[str, Any] = field(default_factory=dict)

    def decay_epochs(self) -> list[int]:
        if self.lr_decay_epochs is not None:
            return list(self.lr_decay_epochs)
        return [max(1, round(self.epochs * m / 240)) for m in (150, 180, 210)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPE_KEYS = frozenset(f.name for f in dataclasses.fields(Recipe))
# What a run is besides its recipe: the keys of a config file's top level.
RUN_KEYS = ("student", "loss", "data", "store", "rounds", "teacher_mode", "teacher", "ckpt")
# What a run's config.json records for the reader; read back, they are ignored (the run's
# checks recompute them: see engine.run_identity).
RECORDED_KEYS = frozenset({"store_rounds", "store_identity", "run_identity", "teacher_sha256", "epochs_extended"})


def make_recipe(student: str, values: dict[str, Any] | None = None, **overrides: Any) -> Recipe:
    """Build the recipe for `student`: defaults, then `values` (a config file's recipe part),
    then non-None overrides. `loss_params` merge key by key at each level."""
    recipe = Recipe()
    if student in LOW_LR_STUDENTS:
        recipe.lr = 0.01
    for layer in (values or {}, {k: v for k, v in overrides.items() if v is not None}):
        for key, value in layer.items():
            if key not in RECIPE_KEYS:
                raise KdcacheError(f"unknown recipe key '{key}'; valid keys: {', '.join(sorted(RECIPE_KEYS))}")
            if key == "loss_params" and not isinstance(value, dict):
                raise KdcacheError(f"recipe loss_params must be a mapping like {{T: 4}}, got {value!r}")
            if key == "loss_params":
                recipe.loss_params = {**recipe.loss_params, **value}
            else:
                setattr(recipe, key, value)
    validate_recipe(recipe)
    return recipe


def load_config_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run keys, recipe values) of a config file: YAML, or a run's config.json.

    Recipe keys may sit at the top level or under `recipe:`; `loss_params` at the top
    level belongs to the recipe. Unknown keys are an error, never ignored."""
    data = _read_yaml(path)
    nested = data.pop("recipe", None) or {}
    if not isinstance(nested, dict):
        raise KdcacheError(f"config {path}: recipe must be a mapping of recipe keys to values")
    run = {key: data.pop(key) for key in RUN_KEYS if key in data}
    flat = {key: data.pop(key) for key in list(data) if key in RECIPE_KEYS}
    unknown = sorted(set(data) - RECORDED_KEYS)
    if unknown:
        raise KdcacheError(f"config {path}: unknown key '{unknown[0]}'; valid keys: "
                           f"{', '.join(sorted({*RUN_KEYS, *RECIPE_KEYS, 'recipe'}))}")
    both = sorted(set(flat) & set(nested) - {"loss_params"})
    if both:
        raise KdcacheError(f"config {path}: '{both[0]}' is given both at the top level and under recipe:")
    params: dict[str, Any] = {}
    for part in (nested, flat):
        value = part.pop("loss_params", None) or {}
        if not isinstance(value, dict):
            raise KdcacheError(f"config {path}: loss_params must be a mapping like {{T: 4}}, got {value!r}")
        params.update(value)
    return run, {**nested, **flat, **({"loss_params": params} if params else {})}


MAX_EPOCHS = 100_000
MAX_SEED = 2**63 - 1


def validate_recipe(recipe: Recipe) -> None:
    """Types and ranges of every field, so a typo in YAML or a flag fails here, in one line,
    instead of deep inside training (or, worse, training on something else)."""
    def bad(key: str, expected: str):
        raise KdcacheError(f"recipe {key} must be {expected}, got {getattr(recipe, key)!r}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v) -> bool:
        return (is_int(v) or isinstance(v, float)) and math.isfinite(v)

    if not is_int(recipe.epochs) or not 1 <= recipe.epochs <= MAX_EPOCHS:
        bad("epochs", f"an integer in 1..{MAX_EPOCHS}")
    if not is_int(recipe.batch_size) or recipe.batch_size < 1:
        bad("batch_size", "a positive integer")
    if not is_number(recipe.lr) or recipe.lr <= 0:
        bad("lr", "a positive number")
    if not is_number(recipe.momentum) or not 0 <= recipe.momentum < 1:
        bad("momentum", "a number in [0, 1)")
    if not is_number(recipe.weight_decay) or recipe.weight_decay < 0:
        bad("weight_decay", "a number >= 0")
    if not is_number(recipe.lr_decay_rate) or not 0 < recipe.lr_decay_rate <= 1:
        bad("lr_decay_rate", "a number in (0, 1]")
    milestones = recipe.lr_decay_epochs
    if milestones is not None and (not isinstance(milestones, list) or not all(is_int(m) and m >= 1 for m in milestones)
                                   or milestones != sorted(set(milestones))):
        bad("lr_decay_epochs", "increasing positive epochs like [150, 180, 210]")
    if not is_int(recipe.seed) or not 0 <= recipe.seed <= MAX_SEED:
        bad("seed", "an integer in 0..2^63-1")
    if recipe.precision not in ("fp32", "bf16"):
        bad("precision", "fp32 or bf16")
    if not isinstance(recipe.channels_last, bool):
        bad("channels_last", "true or false")
    if not isinstance(recipe.loss_params, dict):
        bad("loss_params", "a mapping of loss hyperparameters")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise KdcacheError(f"cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise KdcacheError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KdcacheError(f"config {path} must be a mapping of keys to values (see docs/configs.md)")
    return data


def parse_key_values(pairs: list[str] | None) -> dict[str, Any]:
    """Parse `key=value` strings from the command line; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KdcacheError(f"expected key=value, got '{pair}'")
        out[key.strip()] = yaml.safe_load(value)
    return out
