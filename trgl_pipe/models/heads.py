"""Classifiers F_k: the auxiliary head of each module but the last, and the network's own head."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class AuxHead(nn.Module):
    """DGL-style auxiliary classifier: 3×3 conv → ReLU → avg-pool to p×p → BatchNorm → linear.

    ``hidden > 0`` puts a hidden layer (linear → ReLU) before the output layer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pool_size: int = 2,
        channels: int | None = None,
        hidden: int = 0,
    ) -> None:
        super().__init__()
        channels = channels or in_channels
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.bn = nn.BatchNorm2d(channels)
        features = channels * pool_size * pool_size
        if hidden:
            self.fc: nn.Module = nn.Sequential(
                nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
            )
        else:
            self.fc = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.pool(F.relu(self.conv(x))))
        return self.fc(x.flatten(1))


class FinalHead(nn.Module):
    """The ResNet's own classifier: (BN → ReLU for pre-activation nets) → global pool → linear."""

    def __init__(self, in_channels: int, num_classes: int, preact: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels) if preact else None
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
