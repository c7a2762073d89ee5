"""CIFAR-style ResNets of depth 6n+2 as a flat, ordered list of residual blocks.

The network is stem → blocks[0..3n-1] → head. Module-wise training cuts the block list into K
modules (see :mod:`trgl_pipe.partition`); the stem goes with the first module.
Every block is initialised from its own seed, so the initial weights of block i are the same for
any K and any regime: an end-to-end run and a K-module run start from the same network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trgl_pipe.models.blocks import PostActBlock, PreActBlock, conv3x3, init_weights
from trgl_pipe.models.heads import FinalHead


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


def seeded_generator_seed(seed: int, *tags: int) -> int:
    """A per-part seed derived from the run seed, stable across K, regime and rank."""
    value = seed & 0xFFFFFFFF
    for tag in tags:
        value = (value * 1_000_003 + tag + 1) & 0x7FFFFFFFFFFFFFFF
    return value


class ResNetParts:
    """Stem, blocks and final head of one ResNet, built with per-part seeds."""

    def __init__(
        self, depth: int, width: int, in_channels: int, num_classes: int, block: str, seed: int
    ) -> None:
        self.shapes = block_shapes(depth, width)
        self.preact = block == "preact"
        block_cls = PreActBlock if self.preact else PostActBlock
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeded_generator_seed(seed, 0))
            stem: nn.Module = conv3x3(in_channels, width)
            if not self.preact:
                stem = nn.Sequential(stem, nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            init_weights(stem)
            self.stem = stem
            self.blocks: list[nn.Module] = []
            for i, s in enumerate(self.shapes):
                torch.manual_seed(seeded_generator_seed(seed, 1, i))
                b = block_cls(s.in_channels, s.out_channels, s.stride)
                init_weights(b)
                self.blocks.append(b)
            torch.manual_seed(seeded_generator_seed(seed, 2))
            self.head = FinalHead(self.shapes[-1].out_channels, num_classes, self.preact)
            init_weights(self.head)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)
