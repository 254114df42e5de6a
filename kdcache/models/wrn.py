"""Wide ResNets (WRN-depth-width) of mdistiller/RepDistiller, with their parameter names."""

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models.common import global_pool, init_weights


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a skip.

    As in the original, where the channel count changes the 1x1 `convShortcut` reads the
    pre-activated input; otherwise the raw input is added.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.convShortcut = (
            None if in_planes == out_planes
            else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        skip = x if self.convShortcut is None else self.convShortcut(act)
        return skip + out


class WideStage(nn.Module):
    """A stage of blocks, held as `.layer` to keep the original's names (`block1.layer.0...`)."""

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(num_blocks)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """3x3 stem, three stages of (depth - 4) / 6 blocks at widths 16k, 32k, 64k,
    final BN-ReLU, global pool, linear head."""

    def __init__(self, depth: int, widen: int, num_classes: int):
        super().__init__()
        n = (depth - 4) // 6
        channels = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.block1 = WideStage(n, channels[0], channels[1], 1)
        self.block2 = WideStage(n, channels[1], channels[2], 2)
        self.block3 = WideStage(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        init_weights(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(global_pool(F.relu(self.bn1(x))))

