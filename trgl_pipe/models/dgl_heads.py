"""DGL's auxiliary classifiers (Belilovsky et al., ICML 2020): the "CNN" and "MLP-SR" heads.

CNN:    2 × [3×3 conv (no bias) → BN → ReLU] → average pool to 2×2 → BN → linear.
MLP-SR: average pool to ⌈side/4⌉ → 3 × [1×1 conv (no bias) → BN → ReLU] → average pool to 2×2
        → 3 × [linear → BN → ReLU] → linear (the hidden layers keep 4·C features).
The channel count C of the module's output is kept throughout. ``aux.type`` selects them, so
"DGL" is VanGL with DGL's head, as the TRGL paper compares it.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from trgl_pipe.models.heads import AveragePool


class DglHead(nn.Module):
    """DGL's ``kind`` = "cnn" or "mlp_sr" head for a map of ``channels`` × ``side``."""

    def __init__(self, channels: int, num_classes: int, side: tuple[int, int], kind: str) -> None:
        super().__init__()
        if kind not in ("cnn", "mlp_sr"):
            raise ValueError(f"unknown DGL head {kind!r}")
        self.kind = kind
        self.reduced = (math.ceil(side[0] / 4), math.ceil(side[1] / 4))
        # adaptive pools (no parameters): exact avg_pool2d kernels where the map divides, so that
        # train.deterministic holds on CUDA there (the same means; see AveragePool)
        self.reduce = AveragePool(self.reduced)
        self.pool = AveragePool((2, 2))
        kernel, padding = (3, 1) if kind == "cnn" else (1, 0)
        self.convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, kernel, padding=padding, bias=False), nn.BatchNorm2d(channels)
            )
            for _ in range(2 if kind == "cnn" else 3)
        )
        features = 4 * channels
        if kind == "cnn":
            self.bn: nn.Module = nn.BatchNorm2d(channels)
            self.classifier: nn.Module = nn.Linear(features, num_classes)
        else:
            self.bn = nn.Identity()
            layers: list[nn.Module] = []
            for _ in range(3):
                layers += [nn.Linear(features, features), nn.BatchNorm1d(features), nn.ReLU(True)]
            self.classifier = nn.Sequential(*layers, nn.Linear(features, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "mlp_sr":
            x = self.reduce(x)
        for conv in self.convs:
            x = F.relu(conv(x))
        x = self.bn(self.pool(x))
        return self.classifier(x.flatten(1))
