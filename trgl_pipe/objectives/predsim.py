"""PredSim (Nøkland & Eidnes, ICML 2019): a prediction loss plus a similarity matching loss.

Module k < K-1:  L_k = (1 - β) · CE(F_k(h), y) + β · MSE(S(conv(h)), S(onehot(y)))
    F_k: h average-pooled until it has at most ``dim_in_decoder`` features → linear
    (weights start at zero); conv: a 3×3 convolution without bias; S: the cosine similarity matrix
    of the batch's centred rows, a feature map first reduced to each channel's standard deviation
    over its positions.
The last module: (1 - β) · CE through the network's own head, as the authors' code scales it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trgl_pipe.errors import ConfigError
from trgl_pipe.objectives.base import LocalInputs, ModuleSpec, Objective
from trgl_pipe.objectives.infopro import channels_and_side, to_map


def similarity_matrix(x: Tensor) -> Tensor:
    """Cosine similarity of the centred rows of ``x`` (a 4-D map: per-channel std over positions)."""
    if x.dim() == 4:
        x = x.flatten(2).std(dim=2) if x.shape[1] > 3 and x.shape[2] > 1 else x.flatten(1)
    centred = x - x.mean(dim=1, keepdim=True)
    unit = centred / (1e-8 + centred.pow(2).sum(dim=1).sqrt()).unsqueeze(1)
    return (unit @ unit.T).clamp(-1, 1)


def pooling_for(channels: int, side: int, limit: int) -> tuple[tuple[int, int], tuple[int, int], int]:
    """(kernel, padding, features): the average pool that brings channels × side × side to at most
    ``limit`` features, doubling the kernel's height, then its width, in turn."""
    kh = kw = 1
    h = w = side
    features = channels * h * w
    while features > limit and kh < side:
        kh *= 2
        h = math.ceil(side / kh)
        features = channels * h * w
        if features > limit:
            kw *= 2
            w = math.ceil(side / kw)
            features = channels * h * w
    padding = ((kh * (h - side // kh)) // 2, (kw * (w - side // kw)) // 2)
    return (kh, kw), padding, features


class PredictionHead(nn.Module):
    """PredSim's F_k: average pool to at most ``limit`` features, then one linear layer from zero."""

    def __init__(self, channels: int, side: int, num_classes: int, limit: int, tokens: bool) -> None:
        super().__init__()
        kernel, padding, features = pooling_for(channels, side, limit)
        self.pool = nn.AvgPool2d(kernel, padding=padding) if kernel != (1, 1) else nn.Identity()
        self.fc = nn.Linear(features, num_classes)
        nn.init.zeros_(self.fc.weight)
        self.tokens = tokens

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(self.pool(to_map(h, self.tokens)).flatten(1))


class PredSimObjective(Objective):
    """PredSim for one module. ``objective.kwargs``: ``beta`` (the similarity term's weight) and
    ``dim_in_decoder`` (the prediction head pools its input to at most this many features)."""

    name = "predsim"
    label = "PredSim"

    def __init__(self, spec: ModuleSpec, beta: float = 0.99, dim_in_decoder: int = 4096) -> None:
        super().__init__()
        self.beta = beta
        self.limit = dim_in_decoder
        self.spec = spec
        self.active = not spec.is_last

    @classmethod
    def check_kwargs(cls, kwargs: dict[str, Any], num_modules: int) -> None:
        beta = kwargs.get("beta", 0.99)
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta <= 1:
            raise ConfigError(f"objective.kwargs.beta must be a number in [0, 1], got {beta!r}")
        limit = kwargs.get("dim_in_decoder", 4096)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ConfigError(
                f"objective.kwargs.dim_in_decoder must be a whole number above 0, got {limit!r}"
            )

    def head(self) -> nn.Module | None:
        if not self.active:
            return None
        channels, side = channels_and_side(self.spec.out_shape, self.spec.tokens)
        return PredictionHead(channels, side[0], self.spec.num_classes, self.limit, self.spec.tokens)

    def networks(self) -> nn.ModuleDict:
        if not self.active:
            return nn.ModuleDict()
        channels, _ = channels_and_side(self.spec.out_shape, self.spec.tokens)
        return nn.ModuleDict({"similarity": nn.Conv2d(channels, channels, 3, padding=1, bias=False)})

    def forward(self, nets: nn.ModuleDict, x: Tensor, out: Tensor, image: Tensor | None) -> dict[str, Tensor]:
        if not self.active:
            return {}
        return {"similarity": nets["similarity"](to_map(out, self.spec.tokens))}

    def loss(self, inputs: LocalInputs) -> Tensor:
        prediction = (1 - self.beta) * inputs.ce
        if not self.active:
            return prediction
        onehot = F.one_hot(inputs.y, self.spec.num_classes).to(torch.float32)
        target = similarity_matrix(onehot).detach()
        similarity = F.mse_loss(similarity_matrix(inputs.extras["similarity"].float()), target)
        return prediction + self.beta * similarity
