"""TRGL (constant, halves or adaptive λ) and VanGL as objectives: :class:`trgl_pipe.objective.LocalObjective`
behind the objective interface."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from trgl_pipe.config import TrglConfig
from trgl_pipe.objective import LocalObjective
from trgl_pipe.objectives.base import LocalInputs, ModuleSpec, Objective


class TrglObjective(LocalObjective, Objective):
    """L_k = CE + C_k / (2 τ_k) (or C_k / λ_k); with the transport term disabled, VanGL, which is
    also the end-to-end loss the delayed-gradient regimes train (they call it as ``(ce, kinetic)``)."""

    regimes: ClassVar[tuple[str, ...]] = ("e2e", "parallel", "sequential", "multilap", "ddg", "fr")

    def __init__(self, cfg: TrglConfig, spec: ModuleSpec, device: torch.device) -> None:
        LocalObjective.__init__(self, cfg, spec.index, spec.num_modules, device)
        self.name = "trgl" if self.enabled else "vangl"

    @property
    def uses_kinetic(self) -> bool:  # type: ignore[override]
        return self.enabled

    def loss(self, inputs: LocalInputs) -> Tensor:
        return self(inputs.ce, inputs.kinetic)

    def describe(self) -> dict[str, Any]:
        return {**LocalObjective.describe(self), "method": self.name}
