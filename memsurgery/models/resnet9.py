"""The ResNet9 of the memorization papers (Wang et al., NeurIPS 2024).

Eight conv-BN-ReLU stages with 32, 64, 64, 64, 128, 256, 256, 256 channels; 2x2 max pooling after
conv 1, 2, 5 and 6; residual sums after conv 4 (``res2``, skip from conv 2) and after conv 8
(``res6``, skip from conv 6). The residual additions are modules (``ResidualAdd``) so that forward
hooks see them: the paper's Table 1 measures them as points of their own.

Each stage module (``conv1`` ... ``conv8``) outputs its post-ReLU map BEFORE pooling, which is
the layer output LayerMem and UnitMem use (METRICS.md §3-4). ``forward_features`` returns the
final feature map (the ``res6`` output); ``forward`` global-pools it to 256 features (timm's
``num_classes=0`` convention) and applies a linear head when ``num_classes > 0``.
"""

from __future__ import annotations

import torch
from torch import nn

WIDTHS = (32, 64, 64, 64, 128, 256, 256, 256)


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=False)


class ResidualAdd(nn.Module):
    """``a + b`` as a module, so a forward hook can observe the residual sum."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class ResNet9(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 0) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.num_features = WIDTHS[-1]
        w = WIDTHS
        self.conv1, self.pool1 = ConvBNReLU(in_channels, w[0]), nn.MaxPool2d(2)
        self.conv2, self.pool2 = ConvBNReLU(w[0], w[1]), nn.MaxPool2d(2)
        self.conv3 = ConvBNReLU(w[1], w[2])
        self.conv4 = ConvBNReLU(w[2], w[3])
        self.conv5, self.pool5 = ConvBNReLU(w[3], w[4]), nn.MaxPool2d(2)
        self.conv6, self.pool6 = ConvBNReLU(w[4], w[5]), nn.MaxPool2d(2)
        self.conv7 = ConvBNReLU(w[5], w[6])
        self.conv8 = ConvBNReLU(w[6], w[7])
        self.res2 = ResidualAdd()
        self.res6 = ResidualAdd()
        self.head: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))
        skip = self.pool2(self.conv2(x))
        x = self.res2(self.conv4(self.conv3(skip)), skip)
        x = self.pool5(self.conv5(x))
        skip = self.pool6(self.conv6(x))
        return self.res6(self.conv8(self.conv7(skip)), skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.forward_features(x).mean(dim=(2, 3))
        return self.head(feats)
