"""The one model registry: every teacher and student is built here from its name.

A name is one of three forms:
- a zoo name (`MODELS`): CIFAR models (32x32 inputs) reproducing mdistiller/RepDistiller
  architectures with their parameter names, so that zoo's teacher checkpoints load
  strictly, and torchvision ImageNet models. Names are case-sensitive: `ResNet18` is the
  CIFAR variant (3x3 stem, no max-pool), `resnet18` torchvision's ImageNet one.
- `timm:ARCH`, any timm architecture (`timm:resnet50`); needs the optional `timm` extra.
- `package.module:factory`, any importable callable called as `factory(num_classes=N)`
  that returns an `nn.Module` whose forward maps float images [B,3,H,W] to logits [B,N].
All are randomly initialised (nothing is downloaded); weights come from `load_weights`.
"""

import importlib
from pathlib import Path
from collections.abc import Callable
from functools import partial

from torch import nn

from kdcache.errors import KdcacheError
from kdcache.models.checkpoints import file_sha256, load_weights, read_checkpoint, save_checkpoint
from kdcache.models.mobilenetv2 import MobileNetV2
from kdcache.models.resnet import cifar_resnet, resnet_v2
from kdcache.models.shufflenet import ShuffleV1, ShuffleV2
from kdcache.models.vgg import VGG
from kdcache.models.wrn import WideResNet

__all__ = [
    "MODELS", "create_model", "list_models", "load_teacher",
    "load_weights", "save_checkpoint", "read_checkpoint", "file_sha256",
]

_RESNET_WIDTHS = (16, 16, 32, 64)
_RESNET_X4_WIDTHS = (32, 64, 128, 256)


def _torchvision_model(name: str, num_classes: int) -> nn.Module:
    """A torchvision architecture with random weights (weights=None: never downloads)."""
    import torchvision  # deferred: most runs only need the CIFAR models

    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)


# name -> constructor(num_classes)
MODELS: dict[str, Callable[[int], nn.Module]] = {
    **{f"resnet{d}": partial(cifar_resnet, d, _RESNET_WIDTHS) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": partial(cifar_resnet, 8, _RESNET_X4_WIDTHS),
    "resnet32x4": partial(cifar_resnet, 32, _RESNET_X4_WIDTHS),
    "ResNet18": partial(resnet_v2, "basic", [2, 2, 2, 2]),
    "ResNet50": partial(resnet_v2, "bottleneck", [3, 4, 6, 3]),
    **{f"wrn_{d}_{k}": partial(WideResNet, d, k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{name: partial(VGG, name) for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "MobileNetV2": MobileNetV2,
    "ShuffleV1": ShuffleV1,
    "ShuffleV2": ShuffleV2,
    **{name: partial(_torchvision_model, name) for name in ("resnet18", "resnet34", "resnet50", "mobilenet_v2")},
}


TIMM_PREFIX = "timm:"


def list_models() -> list[str]:
    """Zoo names, sorted; `create_model` also takes `timm:ARCH` and `package.module:factory`."""
    return sorted(MODELS)


def _timm_model(arch: str, num_classes: int) -> nn.Module:
    """A timm architecture with random weights (pretrained=False: never downloads)."""
    try:
        import timm  # optional: only users of timm models install it
    except ImportError:
        raise KdcacheError(f"model '{TIMM_PREFIX}{arch}' needs timm: pip install 'kdcache[timm]'") from None
    if not timm.is_model(arch):
        raise KdcacheError(f"timm has no model '{arch}' (timm.list_models() lists them)")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def _imported_model(path: str, num_classes: int) -> nn.Module:
    """`package.module:factory` called as factory(num_classes=N): the user's own architecture."""
    module_name, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise KdcacheError(f"model '{path}': cannot import {module_name} ({e}); install it or add its "
                           "folder to PYTHONPATH") from None
    except AttributeError:
        raise KdcacheError(f"model '{path}': module {module_name} has no '{attr}'") from None
    model = factory(num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise KdcacheError(f"model '{path}': {attr}(num_classes={num_classes}) returned a "
                           f"{type(model).__name__}, not a torch.nn.Module")
    return model


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build model `name` (a zoo name, `timm:ARCH` or `package.module:factory`) with a
    `num_classes`-way head; its forward returns logits [B, num_classes]."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise KdcacheError(f"num_classes must be a positive integer, got {num_classes!r}")
    if name in MODELS:
        return MODELS[name](num_classes)
    if name.startswith(TIMM_PREFIX):
        return _timm_model(name[len(TIMM_PREFIX):], num_classes)
    module_name, _, attr = name.partition(":")
    if module_name and attr.isidentifier():
        return _imported_model(name, num_classes)
    raise KdcacheError(f"unknown model {name!r}; use one of {', '.join(list_models())}, "
                       "timm:ARCH, or package.module:factory")


def load_teacher(name: str, ckpt: Path, num_classes: int, trusted: bool = False) -> nn.Module:
    """Model `name` with the weights of checkpoint `ckpt`, in eval mode (both stages load teachers so)."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise KdcacheError(f"teacher checkpoint {ckpt} not found; pass --ckpt PATH (or train one with `kdcache train`)")
    model = create_model(name, num_classes)
    load_weights(model, ckpt, trusted=trusted)
    return model.eval()
