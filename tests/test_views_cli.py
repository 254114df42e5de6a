"""`kdcache views show` draws the pixels a store replays (issue 13: --policy strong showed slot 0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from kdcache.cli.views import slot_number, views_app
from kdcache.data import load_split
from kdcache.errors import KdcacheError
from kdcache.precompute import PrecomputeConfig, precompute
from kdcache.replay import replayer_for
from kdcache.replay import DEFAULT_VIEWS

GAP = 2  # render_grid's gap between tiles


def tile(sheet: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    y, x = GAP + row * (size + GAP), GAP + col * (size + GAP)
    return sheet[y:y + size, x:x + size]


def test_views_show_draws_the_stores_views_of_each_slot(tmp_path, digits_dir, teacher_ckpt):
    store = precompute(PrecomputeConfig(teacher="resnet8", ckpt=teacher_ckpt, data_dir=digits_dir,
                                        views=dict(DEFAULT_VIEWS), rounds=1, out=tmp_path / "store", seed=5,
                                        device="cpu"), progress=False)
    replayer = replayer_for(store)
    images = load_split(digits_dir, "train")[0]
    indices = torch.tensor([0, 7, 42])
    size = images.shape[-1]
    for policy, slot_args in [("strong", []), ("weak", []), ("strong", ["--slot", "strong"]),
                              ("strong", ["--slot", "1"])]:
        out = tmp_path / "grid.png"
        args = ["--data", str(digits_dir), "--policy", policy, *slot_args, "--seed", "5", "--index", "0,7,42",
                "--views", "2", "--scale", "1", "--out", str(out)]
        result = CliRunner().invoke(views_app, args)
        assert result.exit_code == 0, result.output
        sheet = np.asarray(Image.open(out))
        for r in range(2):
            stored = replayer.policies[policy](images[indices], replayer.seeds(r, policy, indices))
            for row in range(len(indices)):
                assert np.array_equal(tile(sheet, row, 1 + r, size), stored[row].permute(1, 2, 0).numpy()), \
                    (policy, slot_args, r, row)


def test_slot_number():
    assert [slot_number(None, p) for p in ("weak", "strong", "imagenet_weak", "imagenet_strong", "identity")] == \
        [0, 1, 0, 1, 0]
    assert slot_number("strong", "weak") == 1 and slot_number("3", "strong") == 3
    with pytest.raises(KdcacheError, match="--slot 'medium'"):
        slot_number("medium", "strong")
