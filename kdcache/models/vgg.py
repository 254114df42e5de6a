"""VGG with batch norm (vgg8/11/13/16/19) of mdistiller/RepDistiller, with their names."""

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models.common import global_pool, init_weights

# Output widths of the 3x3 convolutions in each of the five blocks.
VGG_BLOCKS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _vgg_block(in_channels: int, widths: list[int]) -> nn.Sequential:
    """conv3x3(bias)-BN-ReLU repeated, without the last ReLU (forward applies it), which
    gives the original's indices (`block0.0` conv, `block0.1` BN, `block0.3` conv...)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Five conv blocks `block0..block4`, each followed by ReLU; 2x2 max-pool after blocks
    0-2 (and after block 3 only for 64x64 inputs, as in the original), global average pool
    after block 4, linear `classifier`."""

    def __init__(self, name: str, num_classes: int):
        super().__init__()
        blocks = VGG_BLOCKS[name]
        self.block0 = _vgg_block(3, blocks[0])
        self.block1 = _vgg_block(blocks[0][-1], blocks[1])
        self.block2 = _vgg_block(blocks[1][-1], blocks[2])
        self.block3 = _vgg_block(blocks[2][-1], blocks[3])
        self.block4 = _vgg_block(blocks[3][-1], blocks[4])
        self.classifier = nn.Linear(blocks[4][-1], num_classes)
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool_after_block3 = x.shape[2] == 64
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block3(x))
        if pool_after_block3:
            x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        return self.classifier(global_pool(x))
