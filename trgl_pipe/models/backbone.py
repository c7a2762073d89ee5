"""The interface every backbone offers module-wise training, and the registry of backbones.

A backbone is an optional stem, an ordered list of transport blocks (each returns its output and
its residual branches, see :mod:`trgl_pipe.models.blocks`), and the network's own head. Module k
is a contiguous run of blocks (the stem goes with module 0); its auxiliary head is built from the
shape of its last block's output. Backbones know nothing about stages, ranks or distribution.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trgl_pipe.errors import ConfigError
from trgl_pipe.models.init import init_scheme


@dataclass
class Backbone:
    """Stem, blocks and head of one network, with what heads and splits need to know."""

    arch: str
    stem: nn.Module | None
    blocks: list[nn.Module]
    head: nn.Module | None  # the network's own classifier (None: the last module gets an aux head)
    input_shape: tuple[int, int, int]
    tokens: bool = False  # block outputs are [N, H, W, C] (Swin), not [N, C, H, W]
    presets: dict[int, list[int]] = field(default_factory=dict)  # K -> blocks per module
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # each block's output, one sample
    stem_shape: tuple[int, ...] = ()  # the stem's output (the first block's input), one sample

    def __post_init__(self) -> None:
        if not self.shapes:
            self.stem_shape, *self.shapes = output_shapes(self.stem, self.blocks, self.input_shape)

    def input_of(self, block: int) -> tuple[int, ...]:
        """The shape of one sample entering ``block``."""
        return self.stem_shape if block == 0 else self.shapes[block - 1]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def kind(self, i: int) -> str | None:
        """What block i gives, per sample: ``map`` [C, H, W], ``tokens`` [L, D] or [H, W, D] (with
        ``tokens``), ``vector`` [D]; None for a shape no built-in head takes."""
        rank = len(self.shapes[i])
        if rank == 1:
            return "vector"
        if rank == 2:
            return "tokens"
        if rank == 3:
            return "tokens" if self.tokens else "map"
        return None

    def channels(self, i: int) -> int:
        """Channels (or embedding width) of block i's output."""
        return self.shapes[i][0] if self.kind(i) == "map" else self.shapes[i][-1]

    def spatial(self, i: int) -> tuple[int, int]:
        shape = self.shapes[i]
        return (shape[0], shape[1]) if self.tokens else (shape[1], shape[2])

    def fingerprint(self) -> str:
        """A digest of the block shapes and parameter counts: equal on ranks that built the same
        network (compared at the pipeline's setup)."""

        def count(m: nn.Module | None) -> int:
            return 0 if m is None else sum(p.numel() for p in m.parameters())

        parts = {
            "arch": self.arch,
            "stem": [list(self.stem_shape), count(self.stem)],
            "blocks": [[list(s), count(b)] for s, b in zip(self.shapes, self.blocks, strict=True)],
            "head": count(self.head),
        }
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def output_shapes(
    stem: nn.Module | None, blocks: list[nn.Module], input_shape: tuple[int, ...]
) -> list[tuple]:
    """The shape of one sample after the stem, then after each block (a meta-device forward)."""
    with torch.no_grad():
        h = torch.empty((1, *input_shape), device="meta")
        if stem is not None:
            h = copy.deepcopy(stem).to("meta").eval()(h)
        shapes = [tuple(h.shape[1:])]
        for block in blocks:
            h, _ = copy.deepcopy(block).to("meta").eval()(h)
            shapes.append(tuple(h.shape[1:]))
    return shapes


Builder = Callable[..., Any]  # returns a trgl_pipe.Network (or a Backbone)
_REGISTRY: dict[str, Builder] = {}
# where each built-in arch's builder lives: only the named one is imported, so a CIFAR ResNet run
# never imports torchvision (1.2 s of every rank's start-up on a 2-core CPU)
_HOMES = {
    "cifar_resnet": "trgl_pipe.models.cifar_resnet",
    **dict.fromkeys(
        ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"), "trgl_pipe.models.torchvision_resnet"
    ),
    **dict.fromkeys(("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "vgg19"), "trgl_pipe.models.vgg"),
    **dict.fromkeys(("swin_t", "swin_s", "swin_b"), "trgl_pipe.models.swin"),
}


def register(*archs: str) -> Callable[[Builder], Builder]:
    """Add a backbone builder ``builder(cfg, input_shape, num_classes, seed)`` under ``archs``; it
    returns a :class:`trgl_pipe.Network`, as a user's ``model.arch`` callable does."""

    def add(builder: Builder) -> Builder:
        for arch in archs:
            _REGISTRY[arch] = builder
        return builder

    return add


def build_backbone(cfg: object, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> Backbone:
    """The backbone ``cfg.arch`` names (``cfg`` is the model section of the config)."""
    arch = cfg.arch  # type: ignore[attr-defined]
    if ":" in arch:  # an import path: the user's network
        from trgl_pipe.models.user import user_backbone

        return user_backbone(cfg, input_shape, num_classes, seed)
    if arch not in _HOMES:
        raise ConfigError(
            f"model.arch={arch} is not a backbone here; choose one of {', '.join(sorted(_HOMES))}"
        )
    importlib.import_module(_HOMES[arch])  # registers its builders
    from trgl_pipe.models.user import backbone_from_network

    net = _REGISTRY[arch](cfg, input_shape, num_classes, seed)
    return net if isinstance(net, Backbone) else backbone_from_network(net, arch, input_shape)


def initial_weights(model: nn.Module, cfg: Any) -> None:
    """A torchvision model's starting weights: ``model.init_from`` (a state_dict) if given, then
    ``model.init`` if not the default, the same two steps for every torchvision backbone."""
    if cfg.init_from:
        skipped = load_pretrained(model, cfg.init_from)
        if skipped:
            print(f"model.init_from: kept the new {', '.join(skipped)} (shapes differ)", flush=True)
    if cfg.init != "default":
        init_scheme(model, cfg.init, cfg.init_gain)


def load_pretrained(model: nn.Module, path: str) -> list[str]:
    """Load a torchvision state_dict (``weights_only=True``) into ``model``; the keys whose shape
    differs (a classifier for another number of classes) are left as they are and returned."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise ConfigError(f"model.init_from={path}: no such file") from error
    except Exception as error:
        raise ConfigError(
            f"model.init_from={path}: not a readable state_dict ({type(error).__name__})"
        ) from error
    if not isinstance(state, dict):
        raise ConfigError(f"model.init_from={path}: holds a {type(state).__name__}, not a state_dict")
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ConfigError(
            f"model.init_from={path}: {len(unknown)} keys are not in this model (e.g. {unknown[0]}); "
            "is it the state_dict of the same torchvision architecture?"
        )
    skipped = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped
