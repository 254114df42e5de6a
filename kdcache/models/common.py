"""Helpers shared by the CIFAR model definitions."""

import torch
import torch.nn.functional as F
from torch import nn


def init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """Initialise like the mdistiller/RepDistiller originals, so training from scratch matches them.

    Convolutions get He-normal (fan_out) weights and zero biases, batch norms 1/0.
    `linear_std` set: linear layers get N(0, linear_std) weights and zero biases.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> [B,C] mean over space.

    The originals use fixed pooling windows (8 or 4 for ResNet/WRN/ShuffleNet) that reduce
    a 32x32 input's last map to 1x1; a global mean is the same there and also works for
    other input sizes.
    """
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: [N, g*k, H, W] -> interleave the g groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)
