"""AugLocal (Ma et al., ICLR 2024): each module's classifier is built from the architecture of
the network's later layers.

Module k < K-1 ends at layer L (the stem is layer 0, block i is layer i+1) of a network of n
layers. Its auxiliary network takes d_k layers sampled uniformly from the later ones,
    layers round(L + (n − L − 1) / d_k · j), j = 1 … d_k    (every later layer if d_k ≥ n − 1 − L),
and builds for each a residual block shaped like it (3×3 conv → BN → ReLU → 3×3 conv → BN, plus
a 1×1 conv → BN shortcut where the width or the resolution changes; stride 2 while the sampled
layers' maps have halved more often than the blocks so far, at most once per block, as the
authors build them: a single block sampled two stages later halves once), with fresh weights,
never shared with the network; then global average pooling (→ BN when d_k = 1) → linear to the
classes. The loss is the plain cross-entropy of that classifier, so F_k is the auxiliary network
and the module is fully local.
"Pyramid" depth: d_k = max(1, round(d · (1 − k·c/(K−2)) + k·c/(K−2))) falls linearly from d at
module 0 toward 1, with c = ``pyramid`` (0: every module gets d).

The authors count every layer as a module (ResNet-32: 16 − d modules, ResNet-110: 55 − d) and
index the pyramid by layer; here a module may hold several blocks and the pyramid goes by the
module's index, which is the same where each module is one layer.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from trgl_pipe.errors import ConfigError
from trgl_pipe.objectives.base import ModuleSpec, Objective


def pyramid_depth(depth: int, index: int, num_modules: int, coefficient: float) -> int:
    """d_k of module ``index``: from ``depth`` at module 0 linearly toward 1 at module K-2."""
    if num_modules <= 2 or coefficient == 0:
        return depth
    ratio = index * coefficient / (num_modules - 2)
    return max(1, round(depth * (1 - ratio) + ratio))


def sampled_layers(layer: int, num_layers: int, depth: int) -> list[int]:
    """The later layers whose architecture the auxiliary network of the module ending at
    ``layer`` copies: ``depth`` of them spread evenly to the last, or all when fewer remain."""
    if depth >= num_layers - 1 - layer:
        return list(range(layer + 1, num_layers))
    return [round(layer + (num_layers - layer - 1) / depth * j) for j in range(1, depth + 1)]


class SampledBlock(nn.Module):
    """A residual block from ``channels`` to ``out`` channels at ``stride`` (fresh weights)."""

    def __init__(self, channels: int, out: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(inplace=True),
            nn.Conv2d(out, out, 3, padding=1, bias=False),
            nn.BatchNorm2d(out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, h: Tensor) -> Tensor:
        return self.relu(self.branch(h) + self.shortcut(h))


def auxiliary_network(spec: ModuleSpec, depth: int, widen: float) -> nn.Sequential:
    """Module ``spec.index``'s classifier: blocks shaped like ``depth`` sampled later layers,
    then pooling (and BN for a single block) and a linear layer to the classes."""
    layer = spec.last_block  # the stem is layer 0: the module's last block is layer last_block
    num_layers = spec.last_block + 1 + len(spec.later_shapes)
    channels, side = spec.out_shape[0], spec.out_shape[-1]
    owed = 0  # halvings of the map the sampled layers made and the blocks have not yet
    layers: list[nn.Module] = []
    for sampled in sampled_layers(layer, num_layers, depth):
        shape = spec.later_shapes[sampled - layer - 1]
        owed += max(0, int(math.log2(side // shape[-1])))
        side = shape[-1]
        stride = 2 if owed >= 1 else 1  # at most one halving per block, as the authors build them
        owed -= stride == 2
        out = int(shape[0] * widen)
        layers.append(SampledBlock(channels, out, stride))
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if depth <= 1:
        layers.append(nn.BatchNorm1d(channels))
    layers.append(nn.Linear(channels, spec.num_classes))
    net = nn.Sequential(*layers)
    for m in net.modules():  # the authors' initialisation of convolutions and BatchNorm
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


class AugLocalObjective(Objective):
    """AugLocal for one module. ``objective.kwargs``: ``depth`` (d, the auxiliary network's layers
    at module 0; the authors run 1, 3 and 5 on CIFAR-10), ``pyramid`` (c, how far d falls toward
    1 by module K-2; theirs 0.5), ``widen`` (width factor of the sampled blocks)."""

    name = "auglocal"
    label = "AugLocal"
    needs_feature_maps = True

    def __init__(self, spec: ModuleSpec, depth: int = 3, pyramid: float = 0.5, widen: float = 1.0) -> None:
        super().__init__()
        self.spec = spec
        self.settings = (depth, pyramid)
        self.depth = pyramid_depth(depth, spec.index, spec.num_modules, pyramid)
        self.widen = widen
        self.active = not spec.is_last and bool(spec.later_shapes)
        if self.active and (spec.tokens or len(spec.out_shape) != 3):
            raise ConfigError(
                "objective.name=auglocal samples convolutional blocks of the later layers; the network's "
                "modules output token maps or vectors: use a CNN backbone, or another objective"
            )

    @classmethod
    def check_kwargs(cls, kwargs: dict[str, Any], num_modules: int) -> None:
        depth = kwargs.get("depth", 3)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConfigError(
                f"objective.kwargs.depth must be a whole number of layers, 1 or more, not {depth!r}"
            )
        pyramid = kwargs.get("pyramid", 0.5)
        if isinstance(pyramid, bool) or not isinstance(pyramid, int | float) or not 0 <= pyramid <= 1:
            raise ConfigError(f"objective.kwargs.pyramid must be a number in [0, 1], not {pyramid!r}")
        widen = kwargs.get("widen", 1.0)
        if isinstance(widen, bool) or not isinstance(widen, int | float) or widen <= 0:
            raise ConfigError(f"objective.kwargs.widen must be a number above 0, not {widen!r}")

    def head(self) -> nn.Module | None:
        """F_k is the auxiliary network (the last module keeps the network's own head)."""
        return auxiliary_network(self.spec, self.depth, self.widen) if self.active else None

    def describe(self) -> dict[str, Any]:
        depth, pyramid = self.settings
        return {
            "tau": None,
            "lambda": None,
            "method": self.name,
            "label": f"{self.label} (d={depth}, c={pyramid:g})",
        }
