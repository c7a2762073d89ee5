"""Backbones (an ordered list of residual blocks) and classifier heads; no distributed code here."""

from trgl_pipe.models.blocks import PostActBlock, PreActBlock, kinetic_energy
from trgl_pipe.models.heads import AuxHead, FinalHead
from trgl_pipe.models.resnet import BlockShape, ResNetParts, block_shapes

__all__ = [
    "AuxHead",
    "BlockShape",
    "FinalHead",
    "PostActBlock",
    "PreActBlock",
    "ResNetParts",
    "block_shapes",
    "kinetic_energy",
]
