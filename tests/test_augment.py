"""kdcache.augment: seeds, ops against torchvision, replay, parameter statistics, rendering."""

import json
import sys
import types

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from kdcache.augment import (
    POLICY_FORMAT_VERSION, get_policy, list_policies, normalize, policy_from_spec, render_grid, view_seeds,
)
from kdcache.augment import ops
from kdcache.augment.seeds import uniform_streams
from kdcache.cli.views import parse_indices, views_app
from kdcache.errors import KdcacheError

MASK64 = (1 << 64) - 1


def splitmix_reference(z: int) -> int:
    """splitmix64's finaliser in Python integers (the spec in docs/views.md)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def seed_reference(store_seed: int, round: int, slot: int, index: int) -> int:
    h = 0
    for part in (store_seed, round, slot, index):
        h = splitmix_reference((h + part + 0x9E3779B97F4A7C15) & MASK64)
    return h


def test_view_seeds_match_python_reference_with_wraparound():
    indices = torch.tensor([0, 1, 2, 49_999, 2**31 + 5, 2**62 + 123])
    for store_seed, rnd, slot in [(0, 0, 0), (12345, 7, 1), (2**64 - 1, 239, 3), (-1, 1, 0)]:
        got = view_seeds(store_seed, rnd, slot, indices).tolist()
        want = [seed_reference(store_seed & MASK64, rnd, slot, int(i)) for i in indices]
        assert [g & MASK64 for g in got] == want


def test_view_seeds_are_distinct_and_reject_bad_keys():
    seeds = view_seeds(0, 0, 0, torch.arange(200_000))
    assert seeds.dtype == torch.int64
    assert torch.unique(seeds).numel() == 200_000
    with pytest.raises(KdcacheError):
        view_seeds(0, -1, 0, torch.arange(3))
    with pytest.raises(KdcacheError):
        view_seeds(0, 0, 1.5, torch.arange(3))


def test_uniform_streams_are_uniform_and_uncorrelated():
    u = uniform_streams(view_seeds(3, 0, 0, torch.arange(50_000)), 4)
    assert u.dtype == torch.float64 and u.min() >= 0 and u.max() < 1
    assert torch.allclose(u.mean(0), torch.full((4,), 0.5, dtype=torch.float64), atol=0.01)
    corr = torch.corrcoef(u.T) - torch.eye(4, dtype=torch.float64)
    assert corr.abs().max() < 0.02


# ---- ops against torchvision's per-image kernels -------------------------------------------


def make_images(n=12, size=32):
    """Digits in colour (flat regions, sharp edges), noise, and low-contrast images."""
    digits = torch.tensor(load_digits().images[:n] * 15).to(torch.uint8)
    digits = digits.repeat_interleave(size // 8, 1).repeat_interleave(size // 8, 2)
    gen = torch.Generator().manual_seed(0)
    colour = torch.stack([digits, 255 - digits, digits // 2 + 60], dim=1)
    noise = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    dull = torch.randint(90, 140, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    return torch.cat([colour, noise, dull])


IMAGES = make_images()


def per_image(fn, images, values):
    return torch.stack([fn(img, float(v)) for img, v in zip(images, values)])


def magnitudes(low, high, n=len(IMAGES)):
    return torch.linspace(low, high, n, dtype=torch.float64)


def assert_close_uint8(got, want, max_diff, max_fraction):
    """At most max_diff per value, and at most max_fraction of values differing at all."""
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= max_diff
    assert (diff > 0).float().mean() <= max_fraction


@pytest.mark.parametrize("name, ours, theirs", [
    ("Brightness", ops.brightness, TF.adjust_brightness),
    ("Color", ops.color, TF.adjust_saturation),
    ("Contrast", ops.contrast, TF.adjust_contrast),
    ("Sharpness", ops.sharpness, TF.adjust_sharpness),
])
def test_enhance_ops_match_torchvision(name, ours, theirs):
    # torchvision blends with add(alpha=) or x + (1-r)(y-x); float round-off can move a
    # truncation by one level. Our contrast mean is exact (float64 sum).
    factor = magnitudes(*ops.OP_RANGES[name][:2])
    assert_close_uint8(ours(IMAGES, factor), per_image(theirs, IMAGES, factor), 1, 0.01)


def test_exact_ops_match_torchvision():
    bits = torch.tensor([4, 5, 6, 7, 8] * 8)[: len(IMAGES)]
    want = torch.stack([TF.posterize(img, int(b)) for img, b in zip(IMAGES, bits)])
    assert torch.equal(ops.posterize(IMAGES, bits.double()), want)
    # torchvision refuses thresholds above 255; ours in (255, 256) leaves the image alone.
    threshold = magnitudes(0, 255)
    assert torch.equal(ops.solarize(IMAGES, threshold), per_image(TF.solarize, IMAGES, threshold))
    assert torch.equal(ops.solarize(IMAGES, torch.full((len(IMAGES),), 255.5, dtype=torch.float64)), IMAGES)
    assert torch.equal(ops.autocontrast(IMAGES), torch.stack([TF.autocontrast(img) for img in IMAGES]))
    assert torch.equal(ops.equalize(IMAGES), torch.stack([TF.equalize(img) for img in IMAGES]))
    flat = torch.full((2, 3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(ops.equalize(flat), flat) and torch.equal(ops.autocontrast(flat), flat)


def torchvision_geometric(name, img, v):
    """The same inverse map through torchvision's F.affine / F.rotate (nearest, fill 0)."""
    h, w = img.shape[-2:]
    shear = float(np.degrees(np.arctan(v)))
    return {
        "Rotate": lambda: TF.rotate(img, v, interpolation=TF.InterpolationMode.NEAREST),
        "ShearX": lambda: TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[shear, 0.0], center=[0, 0]),
        "ShearY": lambda: TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, shear], center=[0, 0]),
        "TranslateX": lambda: TF.affine(img, angle=0.0, translate=[-v * w, 0.0], scale=1.0, shear=[0.0, 0.0]),
        "TranslateY": lambda: TF.affine(img, angle=0.0, translate=[0.0, -v * h], scale=1.0, shear=[0.0, 0.0]),
    }[name]()


@pytest.mark.parametrize("name", ops.GEOMETRIC)
def test_geometric_ops_match_torchvision(name):
    # Same grid formula, but our grid is elementwise (batch-invariant) and torchvision's a
    # bmm: a source coordinate within round-off of a pixel boundary may pick the neighbour.
    mag = magnitudes(*ops.OP_RANGES[name][:2])
    op = torch.full((len(IMAGES),), ops.OPS.index(name))
    got = ops.affine_nearest(IMAGES, ops.affine_matrices(op, mag, 32, 32))
    want = torch.stack([torchvision_geometric(name, img, float(v)) for img, v in zip(IMAGES, mag)])
    assert_close_uint8(got, want, 255, 0.002)
    assert not torch.equal(got, IMAGES)


def test_pad_crop_flip_matches_torchvision():
    n = len(IMAGES)
    top, left = torch.arange(n) % 9, (torch.arange(n) * 5) % 9
    flip = torch.arange(n) % 2 == 0
    want = []
    for img, t, l, f in zip(IMAGES, top.tolist(), left.tolist(), flip.tolist()):
        crop = TF.crop(TF.pad(img, [4]), t, l, 32, 32)
        want.append(TF.horizontal_flip(crop) if f else crop)
    assert torch.equal(ops.pad_crop_flip(IMAGES, top, left, flip, 4), torch.stack(want))


def test_resized_crop_matches_torchvision_antialias():
    # Down- and up-scaling boxes. PIL's fixed-point algorithm; torchvision's uint8 kernel
    # rounds its weights slightly differently: at most one level apart.
    big = torch.nn.functional.interpolate(IMAGES.float(), size=(64, 48), mode="bilinear").round().to(torch.uint8)
    n = len(big)
    gen = torch.Generator().manual_seed(1)
    h = torch.randint(8, 65, (n,), generator=gen)
    w = torch.randint(8, 49, (n,), generator=gen)
    top = (torch.rand(n, generator=gen) * (65 - h)).long()
    left = (torch.rand(n, generator=gen) * (49 - w)).long()
    flip = torch.arange(n) % 3 == 0
    got = ops.resized_crop(big, top, left, h, w, flip, 32)
    want = []
    for img, t, l, hh, ww, f in zip(big, top.tolist(), left.tolist(), h.tolist(), w.tolist(), flip.tolist()):
        out = TF.resized_crop(img, t, l, hh, ww, [32, 32], antialias=True)
        want.append(TF.horizontal_flip(out) if f else out)
    assert_close_uint8(got, torch.stack(want), 1, 0.05)


def test_cutout_matches_erase():
    n = len(IMAGES)
    side = torch.arange(n) % 16
    top, left = (torch.arange(n) * 7) % 32 - side // 2, (torch.arange(n) * 11) % 32 - side // 2
    got = ops.cutout(IMAGES, top, left, side, (125, 123, 114))
    fill = torch.tensor([125, 123, 114], dtype=torch.uint8).view(3, 1, 1)
    want = []
    for img, t, l, s in zip(IMAGES, top.tolist(), left.tolist(), side.tolist()):
        t0, l0 = max(t, 0), max(l, 0)
        want.append(TF.erase(img, t0, l0, min(t + s, 32) - t0, min(l + s, 32) - l0, fill))
    assert torch.equal(got, torch.stack(want))


def test_identity_policy():
    assert torch.equal(get_policy("identity", 32)(IMAGES, torch.zeros(len(IMAGES), dtype=torch.int64)), IMAGES)
    big = IMAGES.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[:, :, :, 8:56]  # 64 x 48
    got = get_policy("identity", 32, crop_fraction=0.875)(big, torch.zeros(len(big), dtype=torch.int64))
    want = torch.stack([TF.resize(TF.center_crop(img, [42, 42]), [32, 32], antialias=True) for img in big])
    assert_close_uint8(got, want, 1, 0.05)


def test_normalize_matches_torchvision():
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    want = TF.normalize(TF.to_dtype(IMAGES, torch.float32, scale=True), mean, std)
    got = normalize(IMAGES, mean, std)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-6)


# ---- replay: a view depends on its key alone ------------------------------------------------


@pytest.mark.parametrize("name, size", [("weak", 32), ("strong", 32), ("imagenet_strong", 48)])
def test_views_replay_across_batches_orders_and_chunks(name, size):
    policy = get_policy(name, 32)
    images = IMAGES if size == 32 else torch.nn.functional.interpolate(IMAGES.float(), size=size).to(torch.uint8)
    images = torch.cat([images, images.flip(0)])  # 72 samples
    indices = torch.arange(1000, 1000 + len(images))
    full = policy(images, view_seeds(5, 3, 1, indices))
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(2))
    permuted = policy(images[perm], view_seeds(5, 3, 1, indices[perm]))
    assert torch.equal(permuted, full[perm])
    for chunk in (1, 7, 32):
        parts = [policy(images[i:i + chunk], view_seeds(5, 3, 1, indices[i:i + chunk]))
                 for i in range(0, len(images), chunk)]
        assert torch.equal(torch.cat(parts), full)


def test_different_keys_give_different_views():
    policy = get_policy("strong", 32)
    indices = torch.arange(len(IMAGES))
    base = policy(IMAGES, view_seeds(0, 0, 0, indices))
    for key in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        other = policy(IMAGES, view_seeds(*key, indices))
        same = (other == base).flatten(1).all(1)
        assert same.float().mean() < 0.1


# ---- parameter statistics ------------------------------------------------------------------

N_STATS = 20_000


def sampled(name, size=32, input_size=(32, 32), **params):
    return get_policy(name, size, **params).sample(view_seeds(11, 2, 0, torch.arange(N_STATS)), input_size)


def test_weak_crop_and_flip_statistics():
    p = sampled("weak")
    assert abs(p["flip"].float().mean() - 0.5) < 0.02
    for key in ("crop_top", "crop_left"):
        freq = torch.bincount(p[key], minlength=9).double() / N_STATS
        assert len(freq) == 9 and (freq - 1 / 9).abs().max() < 0.015
    assert sampled("weak", size=64)["crop_top"].max() == 16  # pad = size / 8


def test_rand_augment_and_cutout_statistics():
    p = sampled("strong")
    op, mag = p["ra_op"].flatten(), p["ra_magnitude"].flatten()
    freq = torch.bincount(op, minlength=14).double() / len(op)
    assert len(freq) == 14 and (freq - 1 / 14).abs().max() < 0.007
    both_same = (p["ra_op"][:, 0] == p["ra_op"][:, 1]).double().mean()
    assert abs(both_same - 1 / 14) < 0.007  # drawn with replacement, independently
    for i, name in enumerate(ops.OPS):
        low, high, integer = ops.OP_RANGES[name]
        m = mag[op == i]
        assert m.min() >= low and m.max() <= high
        if integer:
            assert set(m.tolist()) == set(range(int(low), int(high) + 1))
        elif high > low:
            assert m.min() < low + 0.02 * (high - low) and m.max() > high - 0.02 * (high - low)
            assert abs(m.mean() - (low + high) / 2) < 0.03 * (high - low)
    side = p["cutout_side"]
    assert side.min() == 0 and side.max() == 15 and abs(side.double().mean() - 7.5) < 0.15
    centre = p["cutout_top"] + side // 2
    assert centre.min() == 0 and centre.max() == 31 and abs(centre.double().mean() - 15.5) < 0.3


def test_resized_crop_statistics():
    p = sampled("imagenet_weak", size=32, input_size=(64, 48))
    h, w, top, left = p["crop_height"], p["crop_width"], p["crop_top"], p["crop_left"]
    assert top.min() >= 0 and left.min() >= 0 and (top + h).max() <= 64 and (left + w).max() <= 48
    area = (h * w).double() / (64 * 48)
    assert area.min() > 0.07 and area.max() <= 1 and area.median() > 0.4
    ratio = w.double() / h.double()
    assert ratio.quantile(0.01) > 0.7 and ratio.quantile(0.99) < 1.4
    assert abs(p["flip"].float().mean() - 0.5) < 0.02
    # Scale (0.9, 1) at ratio 4/3 cannot fit a 64 x 48 box 10 times: torchvision's fallback.
    fallback = sampled("imagenet_weak", input_size=(64, 48), scale=[0.99, 1.0], ratio=[1.5, 2.0])
    assert (fallback["crop_height"] == 32).all() and (fallback["crop_width"] == 48).all()
    assert (fallback["crop_top"] == 16).all() and (fallback["crop_left"] == 0).all()


# ---- registry, spec, errors ----------------------------------------------------------------


def test_registry_and_spec_round_trip():
    assert list_policies() == ["identity", "imagenet_strong", "imagenet_weak", "strong", "weak"]
    for name in list_policies():
        policy = get_policy(name, 32)
        spec = json.loads(json.dumps(policy.spec()))
        assert spec == policy.spec() and spec["policy_format_version"] == POLICY_FORMAT_VERSION
        assert policy_from_spec(spec).spec() == spec
    assert get_policy("strong", 64, num_ops=3).spec()["params"] == {"pad": 8, "num_ops": 3, "cutout": 0.5}


def test_user_errors():
    with pytest.raises(KdcacheError, match="unknown view policy"):
        get_policy("medium", 32)
    with pytest.raises(KdcacheError, match="no parameter"):
        get_policy("weak", 32, padding=4)
    with pytest.raises(KdcacheError, match="scale"):
        get_policy("imagenet_weak", 32, scale=[0.5, 0.1])
    with pytest.raises(KdcacheError, match="format_version"):
        policy_from_spec({**get_policy("weak", 32).spec(), "policy_format_version": 0})
    with pytest.raises(KdcacheError, match="imagenet"):
        get_policy("weak", 32)(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))


# ---- rendering and CLI ---------------------------------------------------------------------


def test_render_grid(tmp_path):
    path = render_grid(IMAGES[:5], tmp_path / "grid.png", ncol=3, scale=2)
    sheet = np.asarray(Image.open(path))
    assert sheet.shape == (2 * (64 + 2) + 2, 3 * (64 + 2) + 2, 3)
    # The fifth image is row 1, column 1, upscaled 2x.
    tile = sheet[68:132:2, 68:132:2]
    assert np.array_equal(tile, IMAGES[4].permute(1, 2, 0).numpy())
    with pytest.raises(KdcacheError):
        render_grid(IMAGES[:1], tmp_path / "missing" / "grid.png", ncol=1)


def test_parse_indices():
    assert parse_indices("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_indices("5") == [5]
    with pytest.raises(KdcacheError):
        parse_indices("a-b")


def test_views_show_cli(tmp_path, monkeypatch):
    fake = types.ModuleType("kdcache.data")
    fake.load_split = lambda data_dir, split: (IMAGES, torch.zeros(len(IMAGES), dtype=torch.int64))
    monkeypatch.setitem(sys.modules, "kdcache.data", fake)
    out = tmp_path / "grid.png"
    args = ["--data", str(tmp_path), "--policy", "strong", "--index", "0-3", "--views", "5", "--scale", "1",
            "--out", str(out)]
    result = CliRunner().invoke(views_app, args)
    assert result.exit_code == 0, result.output
    sheet = np.asarray(Image.open(out))
    assert sheet.shape == (4 * 34 + 2, 6 * 34 + 2, 3)
    assert np.array_equal(sheet[2:34, 2:34], IMAGES[0].permute(1, 2, 0).numpy())  # the original first
    view = get_policy("strong", 32)(IMAGES[1:2], view_seeds(0, 2, 0, torch.tensor([1])))
    assert np.array_equal(sheet[36:68, 2 + 3 * 34:34 + 3 * 34], view[0].permute(1, 2, 0).numpy())
    bad = CliRunner().invoke(views_app, args[:4] + ["--index", "0-99"])
    assert isinstance(bad.exception, KdcacheError)
