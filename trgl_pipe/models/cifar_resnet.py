"""CIFAR-style ResNets of depth 6n+2 (He et al., 2016): 3n residual blocks of widths w, 2w, 4w.

The network is stem (3×3 convolution, stride 1) → blocks[0..3n-1] → head. Every block is
initialised from its own seed, so the initial weights of block i are the same for any K and any
regime: an end-to-end run and a K-module run start from the same network. ``model.block``
chooses pre- or post-activation blocks, ``model.shortcut`` the 1×1 convolution or the
parameter-free pool-and-pad downsampling shortcut, ``model.init`` the initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from trgl_pipe.models.backbone import register
from trgl_pipe.models.blocks import PostActBlock, PreActBlock, conv3x3
from trgl_pipe.models.heads import FinalHead
from trgl_pipe.models.init import fork_seeded, init_scheme
from trgl_pipe.models.user import Network


@dataclass(frozen=True, slots=True)
class BlockShape:
    """Channels and stride of one residual block (resolution divides by the stride)."""

    in_channels: int
    out_channels: int
    stride: int


def block_shapes(depth: int, width: int) -> list[BlockShape]:
    """The 3n blocks of a ResNet-(6n+2): n at each of widths w, 2w, 4w; stride 2 entering 2w and 4w."""
    n = (depth - 2) // 6
    shapes = []
    in_channels = width
    for stage, channels in enumerate((width, 2 * width, 4 * width)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            shapes.append(BlockShape(in_channels, channels, stride))
            in_channels = channels
    return shapes


@register("cifar_resnet")
def cifar_resnet(cfg: Any, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> Network:
    preact = cfg.block == "preact"
    block_cls = PreActBlock if preact else PostActBlock
    shapes = block_shapes(cfg.depth, cfg.width)
    with fork_seeded(seed, 0):
        stem: nn.Module = conv3x3(input_shape[0], cfg.width)
        if not preact:
            stem = nn.Sequential(stem, nn.BatchNorm2d(cfg.width), nn.ReLU(inplace=True))
        init_scheme(stem, cfg.init, cfg.init_gain)
    blocks: list[nn.Module] = []
    for i, s in enumerate(shapes):
        with fork_seeded(seed, 1, i):
            block = block_cls(s.in_channels, s.out_channels, s.stride, cfg.shortcut)
            init_scheme(block, cfg.init, cfg.init_gain)
            blocks.append(block)
    with fork_seeded(seed, 2):
        head = FinalHead(shapes[-1].out_channels, num_classes, preact)
        init_scheme(head, cfg.init, cfg.init_gain)
    return Network(stem=stem, blocks=blocks, head=head)
