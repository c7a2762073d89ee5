"""A local objective of a user's own, outside trgl_pipe, as docs/your-own-objective.md writes one.

``Distill``: each module's loss is the cross-entropy of its classifier plus ``weight`` times the
mean squared error between the module's pooled output, projected by a network of the objective's
own, and a running mean of those projections per class (a class-centre pull). It has an
auxiliary network (the projection), keyword arguments (``weight``, ``width``) and state that a
checkpoint carries (the class centres and the step count).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import trgl_pipe


class Distill(trgl_pipe.Objective):
    name = "distill"
    regimes = ("e2e", "parallel", "sequential", "multilap")

    def __init__(self, spec: trgl_pipe.ModuleSpec, weight: float = 0.1, width: int = 8) -> None:
        super().__init__()
        self.spec = spec
        self.weight = weight
        self.width = width
        self.centres = torch.zeros(spec.num_classes, width)
        self.steps = 0

    def networks(self) -> nn.ModuleDict:
        channels = self.spec.out_shape[-1] if self.spec.tokens else self.spec.out_shape[0]
        return nn.ModuleDict({"projection": nn.Linear(channels, self.width)})

    def forward(self, nets: nn.ModuleDict, x: Tensor, out: Tensor, image: Tensor | None) -> dict[str, Tensor]:
        pooled = out.flatten(2).mean(2) if out.dim() == 4 else out.flatten(1)
        return {"projection": nets["projection"](pooled)}

    def loss(self, inputs: trgl_pipe.LocalInputs) -> Tensor:
        z = inputs.extras["projection"]
        centres = self.centres.to(z.device)
        pull = F.mse_loss(z, centres[inputs.y])
        with torch.no_grad():  # the centres follow the mean projection of their class in the batch
            onehot = F.one_hot(inputs.y, self.spec.num_classes).float()
            # data-parallel replicas each hold a shard: self.average makes the sums the whole batch's
            sums = self.average(onehot.T @ z.detach().float())
            counts = self.average(onehot.sum(0))[:, None]
            moved = 0.9 * centres + 0.1 * sums / counts.clamp(min=1e-12)
            centres = torch.where(counts > 0, moved, centres)
        self.centres = centres
        self.steps += 1
        return inputs.ce + self.weight * pull

    def describe(self) -> dict[str, Any]:
        return {"tau": None, "lambda": None, "method": f"distill(weight={self.weight})"}

    def state_dict(self) -> dict[str, Any]:
        return {"centres": self.centres.cpu().clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.centres = state["centres"].clone()
        self.steps = int(state["steps"])


def not_a_class(spec: trgl_pipe.ModuleSpec) -> trgl_pipe.Objective:
    """A factory function: the config must name the class, whose attributes declare its needs."""
    return Distill(spec)


class NotAnObjective:
    def __init__(self, spec: Any) -> None:
        self.spec = spec
