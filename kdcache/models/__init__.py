"""Model zoo built by name.

CIFAR models (32x32 inputs) reproduce mdistiller/RepDistiller architectures with their
parameter names, so that zoo's teacher checkpoints load strictly; ImageNet models come from
torchvision, randomly initialised. Names are case-sensitive: `ResNet18` is the CIFAR
variant (3x3 stem, no max-pool), `resnet18` torchvision's ImageNet one.
"""

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
    "MODELS", "create_model", "list_models",
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


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(MODELS)


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build model `name` with a `num_classes`-way head; its forward returns logits [B, num_classes]."""
    if name not in MODELS:
        raise KdcacheError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise KdcacheError(f"num_classes must be a positive integer, got {num_classes!r}")
    return MODELS[name](num_classes)
