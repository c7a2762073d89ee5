"""HPFF, hierarchical patch feature fusion (ECCV 2024): each module also trains the module before it
through its own block, with image reconstruction patch by patch.

Module k < K-1 with input x (module k-1's output) and output h = T_k(x):
    L_k = w_local · CE(F_k(h), y) + C_k,
    C_k = w_cascade · [ a_k · Σ_q BCE(D_k^q(h^q), image^q) + b_k · CE(G_k(h), y) ]
where q runs over the four quadrants of the map (floor halves, as the image's), each resized
bilinearly to half the image's side and decoded by a decoder of its own (InfoPro's: 3×3 conv →
BN → ReLU → 3×3 conv → sigmoid) against that quadrant of the image in [0, 1]; F_k and G_k are two
heads of the same architecture (InfoPro's projection head with two convolutions, "2c2f"), F_k
only on the local CE. The last module: L = CE through the network's head, C = w_cascade · CE.
w_local = 0.001, w_cascade = 0.999 (the authors' defaults); (a_k, b_k) move linearly from
``weights[0:2]`` at module 0 to ``weights[2:4]`` at module K-2 (their command: 5, 0.5, 0, 0).

The cascade: C_k's gradient with respect to x trains module k-1 too (the authors run each C_k
on the two modules k-1 and k in one process). Here module k sends ∂C_k/∂x back to module k-1
(``needs_from_next = ("gradient",)``, :meth:`loss_for_previous`), which adds it, backpropagated
through its body at the input of that batch with its *current* weights, to its next step's
update: one step late, as features replay. In one process, the in-process pipeline and torchrun
alike, so the pipeline computes what one process computes.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from trgl_pipe.errors import ConfigError
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

DEFAULT_WEIGHTS = [5.0, 0.5, 0.0, 0.0]  # the authors' --ixx_1 --ixy_1 --ixx_2 --ixy_2


def quadrants(t: Tensor) -> list[Tensor]:
    """Top-left, top-right, bottom-left, bottom-right of a [N, C, H, W] map (floor halves)."""
    h, w = t.shape[-2] // 2, t.shape[-1] // 2
    return [t[..., :h, :w], t[..., :h, w:], t[..., h:, :w], t[..., h:, w:]]


class PatchDecoders(nn.Module):
    """One InfoPro decoder per quadrant, each to half the image's side."""

    def __init__(self, channels: int, image_channels: int, side: tuple[int, int], widen: float) -> None:
        super().__init__()
        half = (side[0] // 2, side[1] // 2)
        self.decoders = nn.ModuleList(Decoder(channels, image_channels, half, widen, True) for _ in range(4))

    def forward(self, h: Tensor) -> list[Tensor]:
        return [decoder(q) for decoder, q in zip(self.decoders, quadrants(h), strict=True)]


class HpffObjective(Objective):
    """HPFF for one module. ``objective.kwargs``: ``weights`` ([a, b] at module 0, then at module
    K-2), ``local_weight`` (0.001), ``cascade_weight`` (0.999), ``widen``, ``feature_dim``."""

    name = "hpff"
    label = "HPFF"
    needs_image = True
    needs_feature_maps = True
    needs_from_next = ("gradient",)
    regimes = ("e2e", "parallel")

    def __init__(
        self,
        spec: ModuleSpec,
        weights: list[float] | None = None,
        local_weight: float = 0.001,
        cascade_weight: float = 0.999,
        widen: float = 1.0,
        feature_dim: int = 128,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.local_weight, self.cascade_weight = local_weight, cascade_weight
        self.widen, self.feature_dim = widen, feature_dim
        self.active = not spec.is_last
        pair = module_weights(list(weights or DEFAULT_WEIGHTS), spec.index, spec.num_modules)
        self.recon_weight, self.task_weight = pair
        self.needs_image = self.reads_image(spec.index, spec.num_modules)
        if self.active:
            require_feature_maps(spec, "hpff", "decodes patches of the module's feature maps")
        self.image_target = ImageTarget(spec)

    @classmethod
    def reads_image(cls, index: int, num_modules: int) -> bool:
        return index < num_modules - 1

    @classmethod
    def check_kwargs(cls, kwargs: dict[str, Any], num_modules: int) -> None:
        check_loss_weights(kwargs.get("weights"))
        for key in ("local_weight", "cascade_weight"):
            value = kwargs.get(key, 0.5)
            if not is_number(value) or value < 0:
                raise ConfigError(f"objective.kwargs.{key} must be a number, 0 or more, got {value!r}")
        check_head_kwargs(kwargs)

    def _head(self) -> ProjectionHead:
        channels, side = channels_and_side(self.spec.out_shape, False)
        return ProjectionHead(channels, side, self.spec.num_classes, self.feature_dim, self.widen, False, 2)

    def head(self) -> nn.Module | None:
        """F_k: the local classifier (2c2f)."""
        return self._head() if self.active else None

    def networks(self) -> nn.ModuleDict:
        if not self.active:
            return nn.ModuleDict()
        channels, _ = channels_and_side(self.spec.out_shape, False)
        image_channels, side = channels_and_side(self.spec.image_shape, False)
        return nn.ModuleDict(
            {"classifier": self._head(), "patches": PatchDecoders(channels, image_channels, side, self.widen)}
        )

    def forward(self, nets: nn.ModuleDict, x: Tensor, out: Tensor, image: Tensor | None) -> dict[str, Tensor]:
        if not self.active:
            return {}
        patches = nets["patches"](out)
        return {"cascade_logits": nets["classifier"](out), **{f"patch{i}": p for i, p in enumerate(patches)}}

    def cascade(self, inputs: LocalInputs) -> Tensor:
        """C_k: the term whose gradient also trains module k-1."""
        if not self.active:
            return self.cascade_weight * inputs.ce
        target = self.image_target(inputs.image)
        recon = sum(
            F.binary_cross_entropy(inputs.extras[f"patch{i}"].float(), part)
            for i, part in enumerate(quadrants(target))
        )
        task = F.cross_entropy(inputs.extras["cascade_logits"].float(), inputs.y)
        return self.cascade_weight * (self.recon_weight * recon + self.task_weight * task)

    def loss(self, inputs: LocalInputs) -> Tensor:
        if not self.active:
            return inputs.ce
        return self.local_weight * inputs.ce + self.cascade(inputs)

    def loss_for_previous(self, inputs: LocalInputs) -> Tensor | None:
        return None if self.spec.index == 0 else self.cascade(inputs)

    def describe(self) -> dict[str, Any]:
        return {"tau": None, "lambda": None, "method": self.name, "label": self.label}
