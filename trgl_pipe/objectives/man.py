"""MAN, the momentum auxiliary network (Su et al., ECCV 2024): InfoPro's local loss read through
a block shaped like the next module's first, half trained and half an average of the real one.

Module k < K-1 with output h, and B the network's first block of module k+1:
    y = LB(h) + EMA(h)
    L_k = λ1 · BCE(D_k(y), image in [0, 1]) + λ2 · CE(F_k(y), y_true)
LB ("learnable bias") is a trainable block of B's architecture; EMA is another whose parameters
never get a gradient (the gradient still flows through it into the module) and follow B's:
    EMA ← m · EMA + (1 − m) · B           (parameters only; its BatchNorm buffers are its own)
D_k is InfoPro's decoder; F_k InfoPro's projection head with two convolutions ("2c2f", the
authors' default), both on y. The last module trains on plain cross-entropy.

The official code updates every EMA once per step with B as it is before that step's update, so
module k at step t reads B's weights up to step t-1. Here module k+1 sends B's parameters back
every N = ``every`` steps (``needs_from_next = ("weights",)``): at step t (t ≥ N, t a multiple of
N) module k applies N steps of the average at once toward B after module k+1's update t - N,
    EMA ← m^N · EMA + (1 − m^N) · B_{t−N}
which for N = 1 is the official schedule exactly. The one-process regime and the pipeline apply
the same weights at the same step, so they compute the same numbers.
Both LB and EMA start from fresh weights drawn like the network's (Kaiming convolutions, BatchNorm
1 and 0), as the official code's start (it copies B before its initialisation loop redraws them).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trgl_pipe.errors import ConfigError
from trgl_pipe.models.init import init_default
from trgl_pipe.objectives.base import LocalInputs, ModuleSpec, Objective
from trgl_pipe.objectives.infopro import (
    Decoder,
    ImageTarget,
    ProjectionHead,
    channels_and_side,
    check_head_kwargs,
    check_loss_weights,
    is_number,
    module_weights,
    require_feature_maps,
)

DEFAULT_WEIGHTS = [5.0, 0.5]  # the authors' ixx_1, ixy_1 (their CIFAR-10 command)


def fresh_copy(block: nn.Module) -> nn.Module:
    """A block of ``block``'s architecture with newly drawn weights (on its device)."""
    new = copy.deepcopy(block)
    for m in new.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    init_default(new)
    return new


class BlockOutput(nn.Module):
    """A block of the network as a plain map h → block(h) (the network's blocks also return their
    residual branches, for the kinetic energy)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, h: Tensor) -> Tensor:
        out = self.block(h)
        return out[0] if isinstance(out, tuple) else out


class ManObjective(Objective):
    """MAN for one module. ``objective.kwargs``: ``momentum`` (m, 0.995 in the authors' command),
    ``every`` (N: module k+1 sends its first block every N steps; 1 is the official schedule),
    ``weights`` ([λ1, λ2] for every module, or [λ1, λ2, λ1', λ2'] moving linearly from module 0
    to module K-2 as InfoPro's), ``head`` ("2c2f", the authors' default, or "1c2f"), ``widen``
    and ``feature_dim`` (of the decoder and F_k, as InfoPro's)."""

    name = "man"
    label = "MAN"
    needs_image = True
    needs_feature_maps = True
    feeds_head = True
    needs_from_next = ("weights",)
    regimes = ("e2e", "parallel")

    def __init__(
        self,
        spec: ModuleSpec,
        momentum: float = 0.995,
        every: int = 1,
        weights: list[float] | None = None,
        head: str = "2c2f",
        widen: float = 1.0,
        feature_dim: int = 128,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.momentum = momentum
        self.weights_every = every
        self.settings = (momentum, every)
        self.head_kind = head
        self.widen = widen
        self.feature_dim = feature_dim
        self.active = not spec.is_last and spec.next_block is not None
        pair = list(weights or DEFAULT_WEIGHTS)
        self.loss_weights = module_weights(pair * 2 if len(pair) == 2 else pair, spec.index, spec.num_modules)
        self.needs_image = self.reads_image(spec.index, spec.num_modules)
        if self.active:
            require_feature_maps(spec, "man", "runs the next block on the module's feature maps")
        self.image_target = ImageTarget(spec)

    @classmethod
    def reads_image(cls, index: int, num_modules: int) -> bool:
        return index < num_modules - 1

    @classmethod
    def check_kwargs(cls, kwargs: dict[str, Any], num_modules: int) -> None:
        momentum = kwargs.get("momentum", 0.995)
        if not is_number(momentum) or not 0 <= momentum <= 1:
            raise ConfigError(f"objective.kwargs.momentum must be a number in [0, 1], got {momentum!r}")
        every = kwargs.get("every", 1)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(
                f"objective.kwargs.every must be a whole number of steps, 1 or more, got {every!r}"
            )
        check_loss_weights(kwargs.get("weights"), (2, 4))
        head = kwargs.get("head", "2c2f")
        if head not in ("2c2f", "1c2f"):
            raise ConfigError(f"objective.kwargs.head={head!r} is not MAN's; choose 2c2f or 1c2f")
        check_head_kwargs(kwargs)

    def head(self) -> nn.Module | None:
        """F_k: InfoPro's projection head on y, which has the next block's output shape."""
        if not self.active:
            return None
        channels, side = channels_and_side(self.spec.later_shapes[0], False)
        convs = 2 if self.head_kind == "2c2f" else 1
        return ProjectionHead(
            channels, side, self.spec.num_classes, self.feature_dim, self.widen, False, convs
        )

    def networks(self) -> nn.ModuleDict:
        if not self.active:
            return nn.ModuleDict()
        assert self.spec.next_block is not None
        ema = BlockOutput(fresh_copy(self.spec.next_block))
        ema.requires_grad_(False)
        channels, _ = channels_and_side(self.spec.later_shapes[0], False)
        target_channels, size = channels_and_side(self.spec.image_shape, False)
        return nn.ModuleDict(
            {
                "learnable": BlockOutput(fresh_copy(self.spec.next_block)),
                "ema": ema,
                "decoder": Decoder(channels, target_channels, size, self.widen, True),
            }
        )

    def forward(self, nets: nn.ModuleDict, x: Tensor, out: Tensor, image: Tensor | None) -> dict[str, Tensor]:
        if not self.active:
            return {"head_input": out}
        y = nets["learnable"](out) + nets["ema"](out)
        if not nets.training:  # evaluation: F_k's accuracy needs y only
            return {"head_input": y}
        return {"head_input": y, "reconstruction": nets["decoder"](y)}

    def take_next_weights(self, nets: nn.ModuleDict, weights: list[Tensor], steps: int) -> None:
        if not self.active:
            return
        keep = self.momentum**steps
        with torch.no_grad():
            for mine, theirs in zip(nets["ema"].parameters(), weights, strict=True):
                mine.copy_(mine * keep + theirs.to(mine.device) * (1 - keep))

    def loss(self, inputs: LocalInputs) -> Tensor:
        if not self.active:
            return inputs.ce
        target = self.image_target(inputs.image)
        recon = F.binary_cross_entropy(inputs.extras["reconstruction"].float(), target)
        recon_weight, task_weight = self.loss_weights
        return recon_weight * recon + task_weight * inputs.ce

    def describe(self) -> dict[str, Any]:
        momentum, every = self.settings
        return {
            "tau": None,
            "lambda": None,
            "method": self.name,
            "label": f"{self.label} (m={momentum:g}, N={every})",
        }
