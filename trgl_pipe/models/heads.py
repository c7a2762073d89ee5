"""Classifiers F_k: auxiliary heads of the modules, and the networks' own heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AuxHead(nn.Module):
    """Auxiliary classifier of a CNN feature map (DGL's, and the authors' "1CNN" head):
    3×3 conv → ReLU → average pool → BatchNorm → linear.

    The pool either brings the map to ``pool_size``×``pool_size`` (adaptive) or, with
    ``pool_kernel``, is the authors' ``AvgPool2d(kernel)`` (the map shrinks by that factor).
    ``hidden > 0`` puts a hidden layer (linear → ReLU) before the output layer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pool_size: int = 2,
        channels: int | None = None,
        hidden: int = 0,
        pool_kernel: int | None = None,
        spatial: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        channels = channels or in_channels
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        if pool_kernel:
            if spatial is None:
                raise ValueError("a pooling kernel needs the feature map's size")
            self.pool: nn.Module = nn.AvgPool2d(pool_kernel)
            out_h, out_w = spatial[0] // pool_kernel, spatial[1] // pool_kernel
        else:
            self.pool = nn.AdaptiveAvgPool2d(pool_size)
            out_h = out_w = pool_size
        self.bn = nn.BatchNorm2d(channels)
        features = channels * out_h * out_w
        if hidden:
            self.fc: nn.Module = nn.Sequential(
                nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
            )
        else:
            self.fc = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.pool(F.relu(self.conv(x))))
        return self.fc(x.flatten(1))


class TokenHead(nn.Module):
    """Auxiliary classifier of tokens [N, L, D] or a Swin feature map [N, H, W, D], as in the
    authors' Swin code: LayerNorm → average over the tokens → linear (``hidden > 0``: linear →
    GELU → linear)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        if hidden:
            self.fc: nn.Module = nn.Sequential(
                nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes)
            )
        else:
            self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x).mean(dim=tuple(range(1, x.dim() - 1))))


class VectorHead(nn.Module):
    """Auxiliary classifier of vectors [N, D]: linear (``hidden > 0``: linear → ReLU → linear)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        if hidden:
            self.fc: nn.Module = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
            )
        else:
            self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class FinalHead(nn.Module):
    """The CIFAR ResNet's own classifier: (BN → ReLU for pre-activation nets) → global pool → linear."""

    def __init__(self, in_channels: int, num_classes: int, preact: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels) if preact else None
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TorchvisionHead(nn.Module):
    """A torchvision model's own classifier: the layers after its feature path, in its order."""

    def __init__(self, *layers: nn.Module, flatten_at: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.flatten_at = flatten_at  # index of the layer before which the map is flattened

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            if i == self.flatten_at:
                x = torch.flatten(x, 1)
            x = layer(x)
        return x
