"""Model zoo and checkpoint tests (CPU only).

The mdistiller reference files live in ../shared/reference beside the repository; tests
that need them skip when that folder is absent.
"""

import argparse
import hashlib
import json
import os
import pickle
import random
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.cli import main
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


def test_random_bytes_are_a_one_line_error(tmp_path):
    (tmp_path / "noise.pth").write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(KdcacheError, match="cannot read checkpoint") as info:
        read_checkpoint(tmp_path / "noise.pth")
    assert "\n" not in str(info.value)


def test_checkpoint_with_python_objects_needs_trust(tmp_path, resnet8_sd, capsys):
    # RepDistiller-style files may pickle the run's options.
    torch.save({"model": resnet8_sd, "opt": argparse.Namespace(lr=0.05)}, tmp_path / "w.pth")
    model = create_model("resnet8", 10)
    with pytest.raises(KdcacheError, match=r"argparse\.Namespace.*--trust-checkpoint") as info:
        load_weights(model, tmp_path / "w.pth")
    assert "\n" not in str(info.value)
    checkpoint = load_weights(model, tmp_path / "w.pth", trusted=True)
    assert checkpoint["opt"].lr == 0.05
    assert torch.equal(model.conv1.weight, resnet8_sd["conv1.weight"])
    warning = capsys.readouterr().err
    assert warning.startswith("warning: unpickling") and warning.count("\n") == 1


class _Numpy1Pickler(pickle._Pickler):
    """Names numpy's globals as numpy 1.x did (numpy.core.multiarray.scalar), as the
    released mdistiller/RepDistiller teachers have them."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "")
        if not module.startswith("numpy._core"):
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"numpy.core{module[len('numpy._core'):]}\n{obj.__qualname__}\n".encode())
        self.memoize(obj)


@pytest.mark.parametrize("numpy_names", ["1.x", "2.x"])
def test_checkpoint_with_numpy_scalars_loads_without_trust(tmp_path, resnet8_sd, numpy_names):
    pickler = types.ModuleType("numpy1_pickle")
    pickler.Pickler = _Numpy1Pickler
    path = tmp_path / "ckpt_epoch_240.pth"
    payload = {"model": resnet8_sd, "epoch": np.int64(240), "accuracy": np.float64(71.5), "best_acc": np.float32(70.25)}
    torch.save(payload, path, pickle_module=pickler if numpy_names == "1.x" else pickle)
    with zipfile.ZipFile(path) as z:
        pickled = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert (b"numpy.core.multiarray\nscalar" in pickled) == (numpy_names == "1.x")
    model = create_model("resnet8", 10)
    checkpoint = load_weights(model, path)
    assert checkpoint["epoch"] == 240 and isinstance(checkpoint["epoch"], np.int64)
    assert checkpoint["accuracy"] == 71.5 and checkpoint["best_acc"] == np.float32(70.25)
    assert torch.equal(model.conv1.weight, resnet8_sd["conv1.weight"])


def test_timm_model_by_name(tmp_path):
    pytest.importorskip("timm")
    model = create_model("timm:test_resnet", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    assert expected.shape == (2, 10)
    # timm's train.py checkpoint: weights under "state_dict", its options as a Namespace.
    torch.save({"epoch": 3, "arch": "test_resnet", "state_dict": model.state_dict(), "version": 2,
                "args": argparse.Namespace(model="test_resnet")}, tmp_path / "last.pth.tar")
    restored = create_model("timm:test_resnet", 10).eval()
    with pytest.raises(KdcacheError, match="--trust-checkpoint"):
        load_weights(restored, tmp_path / "last.pth.tar")
    load_weights(restored, tmp_path / "last.pth.tar", trusted=True)
    with torch.no_grad():
        assert torch.equal(restored(x), expected)
    with pytest.raises(KdcacheError, match="timm has no model 'no_such_net'"):
        create_model("timm:no_such_net", 10)


def test_timm_model_without_timm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(KdcacheError, match=r"needs timm: pip install 'kdcache\[timm\]'"):
        create_model("timm:resnet50", 10)


NETS_MODULE = """
from torch import nn

def tiny(num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

def not_a_model(num_classes):
    return num_classes
"""


@pytest.fixture()
def nets_module(tmp_path, monkeypatch):
    """A user's module `kdcache_test_nets` with factories, importable from tmp_path."""
    (tmp_path / "kdcache_test_nets.py").write_text(NETS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kdcache_test_nets", raising=False)
    return tmp_path


def test_model_from_import_path(nets_module):
    model = create_model("kdcache_test_nets:tiny", 7).eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    save_checkpoint(nets_module / "tiny.pt", model, model_name="kdcache_test_nets:tiny")
    restored = create_model("kdcache_test_nets:tiny", 7)
    load_weights(restored, nets_module / "tiny.pt")
    assert torch.equal(restored[3].weight, model[3].weight)
    for name, error in [("kdcache_absent_nets:tiny", "cannot import kdcache_absent_nets"),
                        ("kdcache_test_nets:absent", "has no 'absent'"),
                        ("kdcache_test_nets:not_a_model", "returned a int, not a torch.nn.Module"),
                        ("kdcache_test_nets:", "unknown model")]:
        with pytest.raises(KdcacheError, match=error):
            create_model(name, 7)


def test_safetensors_round_trip(tmp_path, resnet8_sd):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    # timm and Hugging Face publish weights as safetensors; the format is read from the content.
    for name in ("model.safetensors", "weights.bin"):
        safetensors_torch.save_file(resnet8_sd, tmp_path / name)
        model = create_model("resnet8", 10)
        load_weights(model, tmp_path / name)
        assert all(torch.equal(v, resnet8_sd[k]) for k, v in model.state_dict().items())
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(KdcacheError, match="cannot read safetensors file") as info:
        read_checkpoint(tmp_path / "cut.safetensors")
    assert "\n" not in str(info.value)


def test_safetensors_without_package_says_how_to_install(tmp_path, monkeypatch):
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    (tmp_path / "w.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(KdcacheError, match=r"pip install 'kdcache\[safetensors\]'"):
        read_checkpoint(tmp_path / "w.safetensors")


def _kdcache(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdcache.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_every_loading_command_takes_trust_checkpoint(tmp_path, digits_dir, teacher_ckpt, capsys):
    """precompute, verify, distill (online) and eval refuse a checkpoint with arbitrary objects in
    one line naming --trust-checkpoint (in-process: fast), and load it with the flag and a
    one-line warning (in a subprocess: the warning is printed once per process)."""
    ckpt = tmp_path / "teacher.pth"
    torch.save({**read_checkpoint(teacher_ckpt), "opt": argparse.Namespace(lr=0.1)}, ckpt)
    store = tmp_path / "store"
    data = ["--data", str(digits_dir)]
    commands = [
        ["precompute", "--teacher", "resnet8", "--ckpt", str(ckpt), *data, "--rounds", "1", "--views", "weak",
         "--out", str(store), "--device", "cpu", "--quiet"],
        ["verify", str(store), "--ckpt", str(ckpt), *data, "--samples", "64", "--device", "cpu"],
        ["distill", "--student", "resnet8", "--loss", "kd", "--teacher-mode", "online", "--teacher", "resnet8",
         "--ckpt", str(ckpt), *data, "--epochs", "1", "--batch-size", "512", "--out", str(tmp_path / "run"),
         "--device", "cpu", "--quiet"],
        ["eval", "--model", "resnet8", "--ckpt", str(ckpt), *data, "--device", "cpu"],
    ]
    for command in commands:
        with pytest.raises(SystemExit) as refused:
            main(command)
        error = capsys.readouterr().err
        assert refused.value.code == 1 and error.count("\n") == 1 and "--trust-checkpoint" in error, error
        trusted = _kdcache(*command, "--trust-checkpoint")
        assert trusted.returncode == 0, (command[0], trusted.stderr)
        assert trusted.stderr.count("warning: unpickling") == 1, trusted.stderr


def test_eval_model_from_import_path(nets_module, digits_dir):
    model = create_model("kdcache_test_nets:tiny", 10)
    save_checkpoint(nets_module / "tiny.pt", model)
    result = _kdcache("eval", "--model", "kdcache_test_nets:tiny", "--ckpt", str(nets_module / "tiny.pt"),
                      "--data", str(digits_dir), "--device", "cpu", "--json", env={"PYTHONPATH": str(nets_module)})
    assert result.returncode == 0, result.stderr
    assert 0 <= json.loads(result.stdout)["top1"] <= 100


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
