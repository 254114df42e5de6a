"""Shared fixtures: a small real dataset (scikit-learn digits) and a briefly trained teacher."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """sklearn digits (1438 train / 359 test), zero-padded to 16x16 RGB."""
    from kdcache.data import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_dataset("digits", out, size=16)
    return out


@pytest.fixture(scope="session")
def teacher_ckpt(digits_dir, tmp_path_factory) -> Path:
    """A resnet8 trained for 5 epochs with CE on digits: confident enough for CRLD's masks."""
    from kdcache.distill import DistillConfig, distill
    from kdcache.recipes import make_recipe

    out = tmp_path_factory.mktemp("runs") / "teacher"
    recipe = make_recipe("resnet8", epochs=5, batch_size=64, lr=0.1, lr_decay_epochs=[4])
    distill(DistillConfig(student="resnet8", loss="ce", data_dir=digits_dir, out=out, recipe=recipe,
                          device="cpu", show_progress=False))
    return out / "last.pth"


@pytest.fixture(scope="session")
def weak_store(digits_dir, teacher_ckpt, tmp_path_factory) -> Path:
    """A complete 1-round store of the weak view. Tests read it or copy it; none writes to it."""
    from kdcache.precompute import PrecomputeConfig, precompute

    out = tmp_path_factory.mktemp("stores") / "weak"
    precompute(PrecomputeConfig(teacher="resnet8", ckpt=teacher_ckpt, data_dir=digits_dir, views={"weak": "weak"},
                                rounds=1, out=out, device="cpu"), progress=False)
    return out


@pytest.fixture(scope="session")
def crld_store(digits_dir, teacher_ckpt, tmp_path_factory):
    """A complete 2-round store of the weak and strong views (the LogitStore). Tests only read it."""
    from kdcache.precompute import PrecomputeConfig, precompute

    out = tmp_path_factory.mktemp("stores") / "crld"
    return precompute(PrecomputeConfig(teacher="resnet8", ckpt=teacher_ckpt, data_dir=digits_dir,
                                       views={"weak": "weak", "strong": "strong"}, rounds=2, out=out,
                                       batch_size=256, device="cpu"), progress=False)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA GPU; without one they are skipped."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
