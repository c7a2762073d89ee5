"""torchvision's ResNet-18/34/50/101/152 as transport blocks.

Built by torchvision itself (so a torchvision state_dict loads into it, ``model.init_from``); the
stem is conv1 → bn1 → ReLU → max-pool (``model.small_input=true`` drops the max-pool, for 64×64
images as in the authors' TinyImageNet runs); every BasicBlock or Bottleneck is one block whose
residual r is its branch's output before the addition and before the final ReLU, downsampling
blocks included. The head is torchvision's: average pool → flatten → fc.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from trgl_pipe.models.backbone import initial_weights, register
from trgl_pipe.models.blocks import ResidualBlock
from trgl_pipe.models.heads import TorchvisionHead
from trgl_pipe.models.init import fork_seeded
from trgl_pipe.models.user import Network

# the authors' K=4 splits (blocks per module) where the paper gives them
PRESETS = {"resnet101": {4: [7, 9, 9, 8]}, "resnet152": {4: [11, 13, 13, 13]}}


class TorchvisionResidual(ResidualBlock):
    """A torchvision BasicBlock or Bottleneck: ``relu(identity + r)``, with r exposed.

    Computes what the wrapped block's own forward computes, in the same order (the sum is
    commutative), so the composition equals torchvision's forward bit for bit.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def branches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b = self.block
        r = F.relu(b.bn1(b.conv1(x)))
        if isinstance(b, Bottleneck):
            r = F.relu(b.bn2(b.conv2(r)))
            r = b.bn3(b.conv3(r))
        else:
            r = b.bn2(b.conv2(r))
        identity = x if b.downsample is None else b.downsample(x)
        return identity, r

    def combine(self, s: Tensor) -> Tensor:
        return F.relu(s)


def adapt_input_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The first convolution for images of ``in_channels`` channels (3 keeps torchvision's)."""
    if conv.in_channels == in_channels:
        return conv
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        bias=conv.bias is not None,
    )


@register("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
def torchvision_resnet(cfg: Any, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> Network:
    with fork_seeded(seed, 0):
        model = getattr(torchvision.models, cfg.arch)(weights=None, num_classes=num_classes)
        model.conv1 = adapt_input_channels(model.conv1, input_shape[0])
    initial_weights(model, cfg)
    stem_layers = [model.conv1, model.bn1, model.relu]
    if not cfg.small_input:
        stem_layers.append(model.maxpool)
    layers = (model.layer1, model.layer2, model.layer3, model.layer4)
    blocks: list[nn.Module] = [TorchvisionResidual(b) for layer in layers for b in layer]
    head = TorchvisionHead(model.avgpool, model.fc, flatten_at=1)
    stem = nn.Sequential(*stem_layers)
    return Network(stem=stem, blocks=blocks, head=head, presets=PRESETS.get(cfg.arch, {}))
