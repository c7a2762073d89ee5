"""torchvision's VGG-11/13/16/19 (with BatchNorm, and VGG-19 without) as transport blocks.

VGG has no skip connections, so it has no residual branch to take the kinetic energy of. Its
blocks are the convolution units (conv → BatchNorm → ReLU, with the following max-pool attached
to the unit before it), and the transport cost of a unit is the displacement it applies,
r = T(x) − x, taken where a unit keeps the shape of its input (same channels, no pooling): there
T(x) − x is the discrete-time velocity of the paper, exactly as r is for a residual block
x + r(x). Units that change the channels or the resolution move points between different spaces
and pay nothing, as the downsampling layers of the other backbones do. ``model.vgg_transport=off``
turns the cost off (VanGL then, whatever ``trgl.enabled`` says, for this backbone).
The head is torchvision's: adaptive average pool to 7×7 → flatten → classifier.
"""

from __future__ import annotations

from typing import Any

import torchvision
from torch import Tensor, nn

from trgl_pipe.models.backbone import initial_weights, register
from trgl_pipe.models.blocks import TransportBlock
from trgl_pipe.models.heads import TorchvisionHead
from trgl_pipe.models.init import fork_seeded
from trgl_pipe.models.torchvision_resnet import adapt_input_channels
from trgl_pipe.models.user import Network


class VGGUnit(TransportBlock):
    """conv → (BatchNorm) → ReLU (→ max-pool); residual T(x) − x when it keeps the shape."""

    def __init__(self, layers: list[nn.Module], transport: bool) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.transport = transport

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = self.layers(x)
        return out, [out - x] if self.transport else []


def vgg_units(features: nn.Sequential, transport: bool) -> list[nn.Module]:
    """Cut torchvision's ``features`` into units, each starting at a convolution."""
    groups: list[list[nn.Module]] = []
    for layer in features:
        if isinstance(layer, nn.Conv2d) or not groups:
            groups.append([layer])
        else:
            groups[-1].append(layer)
    units = []
    for group in groups:
        conv = group[0]
        pools = any(isinstance(m, nn.MaxPool2d) for m in group)
        keeps_shape = conv.in_channels == conv.out_channels and conv.stride == (1, 1) and not pools
        units.append(VGGUnit(group, transport and keeps_shape))
    return units


@register("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "vgg19")
def torchvision_vgg(cfg: Any, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> Network:
    with fork_seeded(seed, 0):
        model = getattr(torchvision.models, cfg.arch)(weights=None, num_classes=num_classes)
        model.features[0] = adapt_input_channels(model.features[0], input_shape[0])
    initial_weights(model, cfg)
    blocks = vgg_units(model.features, cfg.vgg_transport == "displacement")
    head = TorchvisionHead(model.avgpool, *model.classifier, flatten_at=1)
    return Network(blocks=blocks, head=head)
