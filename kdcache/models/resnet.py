"""CIFAR ResNets of mdistiller/RepDistiller, with their parameter names.

One builder covers both families: `resnet.py` (resnet8..resnet110, resnet8x4, resnet32x4:
three stages, skip projection named `downsample`, head `fc`) and `resnetv2.py`
(ResNet18, ResNet50: four stages, skip projection `shortcut`, head `linear`).
Both use a 3x3 stride-1 stem without max-pool, post-activation blocks, and a 1x1
conv + BN projection on the skip path where a block changes the map's shape.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models.common import global_pool, init_weights


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Skip path: identity, or 1x1 conv + BN where the block changes the shape."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN, residual add, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut_name: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut_name = shortcut_name
        self.add_module(shortcut_name, _projection(in_planes, planes, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + getattr(self, self.shortcut_name)(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, residual add, ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut_name: str):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut_name = shortcut_name
        self.add_module(shortcut_name, _projection(in_planes, out_planes, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + getattr(self, self.shortcut_name)(x))


class ResNet(nn.Module):
    """Stem, stages `layer1..layerN` (the first at stride 1, each later one halving the
    map), global average pool, linear head."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: list[int],
        widths: list[int],
        num_classes: int,
        *,
        stem_width: int,
        shortcut_name: str,
        head_name: str,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        in_planes = stem_width
        self.stage_names = []
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(in_planes, width, stride, shortcut_name))
                in_planes = width * block.expansion
            self.stage_names.append(f"layer{i + 1}")
            self.add_module(self.stage_names[-1], nn.Sequential(*blocks))
        self.head_name = head_name
        self.add_module(head_name, nn.Linear(in_planes, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return getattr(self, self.head_name)(global_pool(x))


def cifar_resnet(depth: int, widths: tuple[int, int, int, int], num_classes: int) -> ResNet:
    """mdistiller `resnet<depth>` (widths 16,16,32,64) or `resnet<depth>x4` (32,64,128,256):
    (depth - 2) / 6 basic blocks per stage."""
    n = (depth - 2) // 6
    return ResNet(
        BasicBlock, [n] * 3, list(widths[1:]), num_classes,
        stem_width=widths[0], shortcut_name="downsample", head_name="fc",
    )


def resnet_v2(block_name: str, depths: list[int], num_classes: int) -> ResNet:
    """mdistiller `ResNet18` ("basic", [2,2,2,2]) / `ResNet50` ("bottleneck", [3,4,6,3])."""
    block = {"basic": BasicBlock, "bottleneck": Bottleneck}[block_name]
    return ResNet(
        block, depths, [64, 128, 256, 512], num_classes,
        stem_width=64, shortcut_name="shortcut", head_name="linear",
    )
