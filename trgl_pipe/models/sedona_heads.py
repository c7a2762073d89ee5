"""SEDONA's auxiliary decoder (Pyeon et al., ICLR 2021), the head its search picks a depth for.

For a module output of C channels, expansion e and depth L (1-4 in the paper's search):

    pointwise 1×1 conv C → C/e, BN, ReLU, depthwise 3×3 conv stride 2, BN, ReLU
    → L − 1 inverted residual blocks (expansion e; stride 2 at every second one, i = 1, 3, ...,
      while the map is at least 2 wide, each stride adding C/(2e) channels, C/e when e = 1)
    → 1×1 conv to D channels, BN, ReLU → global average pool → linear.

SEDONA uses e = 1 for ResNet-18/34 (basic blocks) and 4 otherwise, and D = 512 × its width
multiplier (512 on CIFAR's 16-channel ResNets). Its loss is the cross-entropy with labels
smoothed to 1 − ε on the target and ε/(C − 1) elsewhere (ε = 0.1): that is torch's
``label_smoothing`` = ε · C/(C − 1) (``optim.label_smoothing``; docs/method.md).
"""

from __future__ import annotations

from torch import Tensor, nn

from trgl_pipe.models.heads import AveragePool

# SEDONA's expansion for backbones of basic blocks (its rule: ResNet-18 and -34; here also the
# CIFAR ResNets, which are built of basic blocks); every other backbone gets 4
BASIC_BLOCK_ARCHS = ("cifar_resnet", "resnet18", "resnet34")
FINAL_DIM = 512


def sedona_expand(arch: str) -> int:
    """SEDONA's expansion ratio for ``model.arch``."""
    return 1 if arch in BASIC_BLOCK_ARCHS else 4


def _bn_relu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expansion (when e > 1), 3×3 depthwise, linear 1×1 projection;
    the input is added back where stride is 1 and the widths agree."""

    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), *_bn_relu(hidden)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), *_bn_relu(hidden)]
        layers += [nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out
        self.shape = (inp, out, stride)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class SedonaHead(nn.Module):
    """SEDONA's decoder of ``depth`` for a map of ``channels`` × ``side`` (see the module)."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        side: tuple[int, int],
        depth: int,
        expand: int,
        final_dim: int = FINAL_DIM,
    ) -> None:
        super().__init__()
        if depth < 1 or expand < 1:
            raise ValueError(f"SEDONA's head needs depth >= 1 and expand >= 1, got {depth} and {expand}")
        planes = max(channels // expand, 1)
        increment = max(planes // 2, 1) if expand > 1 else planes
        layers: list[nn.Module] = [
            nn.Conv2d(channels, planes, 1, bias=False),
            *_bn_relu(planes),
            nn.Conv2d(planes, planes, 3, 2, 1, groups=planes, bias=False),
            *_bn_relu(planes),
        ]
        size = min(side) // 2
        width = planes
        for i in range(depth - 1):
            stride = 2 if size >= 2 and i % 2 == 1 else 1
            out = width + increment if stride == 2 else width
            layers.append(InvertedResidual(width, out, stride, expand))
            width, size = out, size // 2 if stride == 2 else size
        layers += [nn.Conv2d(width, final_dim, 1, bias=False), *_bn_relu(final_dim)]
        self.features = nn.Sequential(*layers)
        self.pool = AveragePool((1, 1))
        self.classifier = nn.Linear(final_dim, num_classes)

    def blocks(self) -> list[tuple[int, int, int]]:
        """(in, out, stride) of each inverted residual block, in order."""
        return [m.shape for m in self.features if isinstance(m, InvertedResidual)]

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
