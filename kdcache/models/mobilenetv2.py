"""MobileNetV2 as in mdistiller/RepDistiller (`mobile_half`: width 0.5, expansion 6,
plain ReLU, stride-2 stem for 32x32 inputs), with their parameter names."""

import torch
from torch import nn

from kdcache.models.common import global_pool, init_weights

# (expansion, output channels at width 1, blocks, stride of the first block)
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU (carrying the stride), 1x1 project-BN;
    residual add where the shape is kept. The expand conv exists even at expansion 1,
    unlike torchvision's."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """Stem `conv1`, seven `blocks` stages, 1x1 `conv2` to 1280 channels, global pool,
    `classifier`."""

    def __init__(self, num_classes: int, width_mult: float = 0.5):
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for expansion, width, count, stride in SETTINGS:
            out_ch = int(width * width_mult)
            stage = []
            for i in range(count):
                stage.append(InvertedResidual(channels, out_ch, stride if i == 0 else 1, expansion))
                channels = out_ch
            self.blocks.append(nn.Sequential(*stage))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(global_pool(self.conv2(x)))
