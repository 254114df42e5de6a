"""Model zoo and checkpoint tests (CPU only).

The mdistiller reference files live in ../shared/reference beside the repository; tests
that need them skip when that folder is absent.
"""

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch

from kdcache.errors import KdcacheError
from kdcache.models import (
    create_model,
    file_sha256,
    list_models,
    load_weights,
    read_checkpoint,
    save_checkpoint,
)

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
CKPTS = REFERENCE / "mdistiller_ckpts"
STATE_DICTS_JSON = REFERENCE / "mdistiller_cifar100_state_dicts.json"

CIFAR_MODELS = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "ResNet18", "ResNet50",
    "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
    "MobileNetV2", "ShuffleV1", "ShuffleV2",
]
IMAGENET_MODELS = ["resnet18", "resnet34", "resnet50", "mobilenet_v2"]


@pytest.fixture(scope="module")
def reference_state_dicts() -> dict:
    if not STATE_DICTS_JSON.is_file():
        pytest.skip(f"reference file absent: {STATE_DICTS_JSON}")
    return json.loads(STATE_DICTS_JSON.read_text())


def test_registry_lists_every_model():
    assert set(CIFAR_MODELS + IMAGENET_MODELS) <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", ["resnet20", "resnet8x4", "wrn_16_2"])
def test_mdistiller_checkpoint_reproduces_logits(name):
    ckpt = CKPTS / f"{name}_ckpt_epoch_240.pth"
    if not ckpt.is_file():
        pytest.skip(f"reference checkpoint absent: {ckpt}")
    model = create_model(name, 100).eval()
    checkpoint = load_weights(model, ckpt)
    assert checkpoint["epoch"] == 240
    inputs = torch.load(CKPTS / "inputs.pt", weights_only=True)
    expected = torch.load(CKPTS / f"{name}_logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(inputs)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_state_dict_matches_mdistiller(name, reference_state_dicts):
    reference = reference_state_dicts[name]
    model = create_model(name, 100)
    got = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert got == reference["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == reference["num_params"]


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", CIFAR_MODELS + IMAGENET_MODELS)
def test_forward_gives_logits_and_uses_every_layer(name, num_classes):
    model = create_model(name, num_classes).eval()
    # A module that holds parameters but never runs would be dead weight in a checkpoint.
    unused = {n for n, m in model.named_modules() if list(m.parameters(recurse=False))}
    for module_name in list(unused):
        model.get_submodule(module_name).register_forward_hook(
            lambda m, i, out, key=module_name: unused.discard(key)
        )
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert unused == set()
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, num_classes) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


# Spatial size of a module's output for one input size: pins the originals' strides and
# pooling (e.g. MobileNetV2's stride-2 stem, VGG pooling after block3 only at 64x64).
MAP_SIZES = [
    ("resnet8x4", 32, {"layer1": 32, "layer2": 16, "layer3": 8}),
    ("ResNet50", 32, {"layer1": 32, "layer4": 4}),
    ("wrn_16_2", 32, {"block1": 32, "block3": 8}),
    ("vgg8", 32, {"block0": 32, "block3": 4, "block4": 4}),
    ("vgg8", 64, {"block3": 8, "block4": 4}),
    ("MobileNetV2", 32, {"conv1": 16, "blocks.1": 16, "blocks.2": 8, "blocks.5": 2, "conv2": 2}),
    ("ShuffleV1", 32, {"conv1": 32, "layer1": 16, "layer3": 4}),
    ("ShuffleV2", 32, {"conv1": 32, "layer1": 16, "layer3": 4, "conv2": 4}),
]


@pytest.mark.parametrize("name,size,expected", MAP_SIZES)
def test_feature_map_sizes(name, size, expected):
    model = create_model(name, 10).eval()
    seen = {}
    for module_name in expected:
        module = model.get_submodule(module_name)
        module.register_forward_hook(lambda m, i, out, key=module_name: seen.__setitem__(key, out.shape[-1]))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    assert seen == expected


def test_create_model_rejects_bad_arguments():
    with pytest.raises(KdcacheError, match="unknown model 'resnet9'.*resnet8x4"):
        create_model("resnet9", 10)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(KdcacheError, match="num_classes"):
            create_model("resnet8", bad)


@pytest.fixture()
def resnet8_sd():
    torch.manual_seed(1)
    return create_model("resnet8", 10).state_dict()


@pytest.mark.parametrize("layout", ["plain", "mdistiller", "ddp"])
def test_load_weights_accepts_layouts(tmp_path, resnet8_sd, layout):
    payload = {
        "plain": resnet8_sd,
        "mdistiller": {"model": resnet8_sd, "epoch": 240, "best_acc": 71.5},
        "ddp": {"model": {f"module.{k}": v for k, v in resnet8_sd.items()}},
    }[layout]
    torch.save(payload, tmp_path / "w.pth")
    model = create_model("resnet8", 10)
    load_weights(model, tmp_path / "w.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(value, resnet8_sd[key]), key


def test_load_weights_accepts_torchvision_state_dict(tmp_path):
    source = create_model("resnet18", 1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    target = create_model("resnet18", 1000)
    load_weights(target, tmp_path / "resnet18.pth")
    assert torch.equal(target.fc.weight, source.fc.weight)
    assert torch.equal(target.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)


def test_load_weights_names_wrong_head_shape_and_leaves_model_unchanged(tmp_path, resnet8_sd):
    torch.save({"model": resnet8_sd}, tmp_path / "w.pth")
    model = create_model("resnet8", 100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KdcacheError) as info:
        load_weights(model, tmp_path / "w.pth")
    message = str(info.value)
    assert "shape mismatch" in message and "fc.weight [10, 64] vs model [100, 64]" in message
    assert "\n" not in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_weights_names_missing_and_unexpected_keys(tmp_path, resnet8_sd):
    torch.save(resnet8_sd, tmp_path / "resnet8.pth")
    with pytest.raises(KdcacheError, match=r"missing keys: layer1\.1\.conv1\.weight.*\(\+\d+ more\)"):
        load_weights(create_model("resnet14", 10), tmp_path / "resnet8.pth")
    torch.save(create_model("resnet14", 10).state_dict(), tmp_path / "resnet14.pth")
    with pytest.raises(KdcacheError, match=r"unexpected keys: layer1\.1\.conv1\.weight"):
        load_weights(create_model("resnet8", 10), tmp_path / "resnet14.pth")


def test_read_checkpoint_errors(tmp_path):
    with pytest.raises(KdcacheError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(KdcacheError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "junk.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(KdcacheError, match="holds a list"):
        read_checkpoint(tmp_path / "list.pth")
    torch.save({"a": 1}, tmp_path / "nodict.pth")
    with pytest.raises(KdcacheError, match="holds no state dict"):
        load_weights(create_model("resnet8", 10), tmp_path / "nodict.pth")


def test_checkpoint_with_python_objects_needs_trust(tmp_path, resnet8_sd):
    # RepDistiller-style files may pickle the run's options.
    torch.save({"model": resnet8_sd, "opt": argparse.Namespace(lr=0.05)}, tmp_path / "w.pth")
    model = create_model("resnet8", 10)
    with pytest.raises(KdcacheError, match="trusted=True"):
        load_weights(model, tmp_path / "w.pth")
    checkpoint = load_weights(model, tmp_path / "w.pth", trusted=True)
    assert checkpoint["opt"].lr == 0.05
    assert torch.equal(model.conv1.weight, resnet8_sd["conv1.weight"])


def test_kdcache_checkpoint_round_trip(tmp_path):
    torch.manual_seed(2)
    model = create_model("wrn_16_1", 10).eval()
    path = tmp_path / "run" / "student.pt"
    info = {
        "model_name": "wrn_16_1", "num_classes": 10, "dataset_fingerprint": "ab" * 32,
        "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "epoch": 7,
    }
    save_checkpoint(path, model, **info)
    assert sorted(p.name for p in path.parent.iterdir()) == ["student.pt"]  # no temp file left
    checkpoint = read_checkpoint(path)
    assert checkpoint["format"] == "kdcache-checkpoint" and checkpoint["version"] == 1
    assert {k: checkpoint[k] for k in info} == info

    restored = create_model(checkpoint["model_name"], checkpoint["num_classes"]).eval()
    load_weights(restored, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))

    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(path, model, version=2)


def test_file_sha256(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f.bin").write_bytes(data)
    assert file_sha256(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()
    with pytest.raises(KdcacheError, match="cannot read"):
        file_sha256(tmp_path / "absent.bin")
