"""ShuffleNetV1 (groups 3) and ShuffleNetV2 (1x) for 32x32 inputs, as in
mdistiller/RepDistiller, with their parameter names. Stem: 1x1 conv to 24 channels at
stride 1; each of the three stages starts with a stride-2 unit (32 -> 16 -> 8 -> 4)."""

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models.common import channel_shuffle, global_pool

STEM_WIDTH = 24


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1. At stride 2 the output is
    concatenated with a 3x3 average-pooled input, otherwise added to it."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        mid = out_planes // 4
        # The stem's 24 channels get an ungrouped first conv, as in the original.
        self.first_groups = 1 if in_planes == STEM_WIDTH else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleV1(nn.Module):
    """mdistiller `ShuffleV1`: widths 240/480/960, 4/8/4 units, groups 3, head `linear`."""

    def __init__(self, num_classes: int, widths=(240, 480, 960), depths=(4, 8, 4), groups: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_WIDTH, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        in_planes = STEM_WIDTH
        stages = []
        for width, depth in zip(widths, depths):
            # The stride-2 unit concatenates its input, so it only adds width - in_planes.
            units = [ShuffleV1Unit(in_planes, width - in_planes, 2, groups)]
            units += [ShuffleV1Unit(width, width, 1, groups) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*units))
            in_planes = width
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(global_pool(x))


class ShuffleV2Unit(nn.Module):
    """Split channels in halves; the second half goes 1x1-BN-ReLU, depthwise 3x3-BN,
    1x1-BN-ReLU; concatenate with the first half and shuffle in 2 groups."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2Down(nn.Module):
    """Stride-2 unit: left branch depthwise 3x3-BN, 1x1-BN-ReLU; right branch 1x1-BN-ReLU,
    depthwise 3x3-BN, 1x1-BN-ReLU; concatenate and shuffle in 2 groups."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleV2(nn.Module):
    """mdistiller `ShuffleV2` (net size 1): widths 116/232/464, 3/7/3 units after each
    stride-2 unit, 1x1 `conv2` to 1024 channels, head `linear`."""

    def __init__(self, num_classes: int, widths=(116, 232, 464), depths=(3, 7, 3), last_width: int = 1024):
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_WIDTH, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        in_channels = STEM_WIDTH
        stages = []
        for width, depth in zip(widths, depths):
            units = [ShuffleV2Down(in_channels, width)] + [ShuffleV2Unit(width) for _ in range(depth)]
            stages.append(nn.Sequential(*units))
            in_channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(in_channels, last_width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last_width)
        self.linear = nn.Linear(last_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(global_pool(x))
