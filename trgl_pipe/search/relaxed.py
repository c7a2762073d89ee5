"""SEDONA's relaxed network: every gap between two blocks is a candidate cut, softly decoupled.

At the gap after block i, with a = softmax(α_i) (a_cut + a_pass = 1), the gap's heads of depth
1..D give L_i = CE(Σ_d b_d · head_{i,d}(h_i), y), b = softmax(β_i). The relaxed loss is SEDONA's
nested mix

    L = a_cut(0)·L_0 + a_pass(0)·(a_cut(1)·L_1 + a_pass(1)·(… + a_pass(B−2)·L_own)),

and each block j's gradient is divided by Π_{l < j} a_pass(l), so block j moves by

    Σ_{i ≥ j} a_cut(i) · Π_{j ≤ l < i} a_pass(l) · ∂L_i/∂θ_j     (the last term with L_own):

a_cut(i) = 1 is a cut (the blocks below see only L_i), a_pass(i) = 1 no cut (end-to-end). The
heads of gap i are divided by a_cut(i) as well, so they learn from L_i at full weight whatever
the gap's weights (SEDONA's code rescales their input and output by 1/a_cut for that).

Both the loss and the divisions are plain functions of (θ, α, β): the meta-gradient through
unrolled steps is exact (a gate that only scales the backward pass is not, once a second step
differentiates through the first: its identity forward would be differentiated as the scaling).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trgl_pipe.errors import ConfigError
from trgl_pipe.models.backbone import Backbone
from trgl_pipe.models.init import fork_seeded, init_scheme
from trgl_pipe.models.sedona_heads import FINAL_DIM, SedonaHead, sedona_expand


def smoothing_for(epsilon: float, num_classes: int) -> float:
    """torch's ``label_smoothing`` equal to SEDONA's: 1 − ε on the target, ε/(C − 1) elsewhere."""
    return epsilon * num_classes / (num_classes - 1)


class RelaxedNetwork(nn.Module):
    """The whole backbone with SEDONA's heads of depth 1..``max_depth`` at each of its B − 1 gaps.

    ``forward(x, y, mix)`` takes each gap's head mix ([B − 1, max_depth]) and returns the gaps'
    losses [B − 1] and the network's own output (logits); with ``mix=None`` no head runs (no
    losses: an empty tensor). :meth:`gradient_scales` gives the divisions of the module docstring.
    """

    def __init__(
        self,
        parts: Backbone,
        final_head: nn.Module,
        num_classes: int,
        max_depth: int,
        expand: int,
        final_dim: int,
        smoothing: float,
        seed: int,
        init: str = "default",
        init_gain: float = 1.0,
    ) -> None:
        super().__init__()
        self.stem = parts.stem
        self.blocks = nn.ModuleList(parts.blocks)
        self.final_head = final_head
        self.smoothing = smoothing
        heads = []
        for i in range(parts.num_blocks - 1):
            if parts.kind(i) != "map":
                raise ConfigError(
                    f"the search puts SEDONA's heads after every block; block {i} of model.arch="
                    f"{parts.arch} gives {parts.kind(i) or 'other'} outputs, not [N, C, H, W] maps"
                )
            at_gap = []
            for depth in range(1, max_depth + 1):
                with fork_seeded(seed, 11, i, depth):
                    head = SedonaHead(
                        parts.channels(i), num_classes, parts.spatial(i), depth, expand, final_dim
                    )
                    init_scheme(head, init, init_gain)
                at_gap.append(head)
            heads.append(nn.ModuleList(at_gap))
        self.heads = nn.ModuleList(heads)
        self._groups = self.parameter_groups()

    @property
    def num_gaps(self) -> int:
        return len(self.heads)

    def forward(self, x: Tensor, y: Tensor, mix: Tensor | None) -> tuple[Tensor, Tensor]:
        h = self.stem(x) if self.stem is not None else x
        losses = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            h, _ = block(h)
            if i == last or mix is None:
                continue
            logits = sum(mix[i, d] * head(h) for d, head in enumerate(self.heads[i]))
            losses.append(F.cross_entropy(logits, y, label_smoothing=self.smoothing))
        stacked = torch.stack(losses) if losses else h.new_zeros(0)
        return stacked, self.final_head(h)

    def parameter_groups(self) -> dict[str, tuple[str, int]]:
        """Each parameter's place: ("block", j) for block j (the stem with block 0, the network's
        own head with the last block) or ("head", i) for a head of gap i."""
        last = len(self.blocks) - 1
        groups = {}
        for name, _ in self.named_parameters():
            first, _, rest = name.partition(".")
            if first == "stem":
                groups[name] = ("block", 0)
            elif first == "final_head":
                groups[name] = ("block", last)
            else:
                groups[name] = ("block" if first == "blocks" else "head", int(rest.partition(".")[0]))
        return groups

    def gradient_scales(self, cut: Tensor, passing: Tensor) -> dict[str, Tensor]:
        """The factor of each parameter's gradient of the nested mix: 1 / Π_{l < j} a_pass(l) for
        block j, and 1 / (a_cut(i) · Π_{l < i} a_pass(l)) for the heads of gap i."""
        prefix = torch.cat([passing.new_ones(1), torch.cumprod(passing, 0)])
        scales = {}
        for name, (kind, index) in self._groups.items():
            weight = prefix[index] if kind == "block" else prefix[index] * cut[index]
            scales[name] = 1 / weight
        return scales


def build_relaxed(
    cfg: Any, parts: Backbone, final_head: nn.Module, num_classes: int, max_depth: int, epsilon: float
) -> RelaxedNetwork:
    """The relaxed network of a config's backbone, with batch norm on batch statistics only
    (no running statistics: the unrolled steps stay pure functions of the weights)."""
    from torch.func import replace_all_batch_norm_modules_

    net = RelaxedNetwork(
        parts,
        final_head,
        num_classes,
        max_depth,
        cfg.aux.expand or sedona_expand(cfg.model.arch),
        cfg.aux.channels or FINAL_DIM,
        smoothing_for(epsilon, num_classes),
        cfg.seed,
        cfg.model.init,
        cfg.model.init_gain,
    )
    replace_all_batch_norm_modules_(net)
    return net
