"""Backbones (an ordered list of transport blocks), their heads and initialisation; no distributed
code here. Each backbone module registers its architectures with :func:`register`."""

from trgl_pipe.models.backbone import Backbone, build_backbone, register
from trgl_pipe.models.blocks import (
    PadShortcut,
    PointwiseConv,
    PostActBlock,
    PreActBlock,
    TransportBlock,
    kinetic_energy,
)
from trgl_pipe.models.cifar_resnet import BlockShape, block_shapes
from trgl_pipe.models.heads import AuxHead, FinalHead, TokenHead, VectorHead
from trgl_pipe.models.user import Network, Residual

__all__ = [
    "AuxHead",
    "Backbone",
    "BlockShape",
    "FinalHead",
    "Network",
    "PadShortcut",
    "PointwiseConv",
    "PostActBlock",
    "PreActBlock",
    "Residual",
    "TokenHead",
    "TransportBlock",
    "VectorHead",
    "block_shapes",
    "build_backbone",
    "kinetic_energy",
    "register",
]
