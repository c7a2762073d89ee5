"""TRGL (constant, halves or adaptive λ) and VanGL as objectives.

    constant / halves:  L_k = CE + C_k / (2 τ_k)
    adaptive:           L_k = CE + C_k / λ_k,   λ_k ← λ_k + h·CE every s steps   (λ = 2τ)
    VanGL (disabled):   L_k = CE

C_k = Σ_m mean_b ‖r_m‖² over the module's residual blocks m (see models.blocks.kinetic_energy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from trgl_pipe.config import TrglConfig
from trgl_pipe.objectives.base import LocalInputs, ModuleSpec, Objective


def tau_for_module(index: int, num_modules: int, tau: float, schedule: str, tau_of: str = "first") -> float:
    """τ_k of module ``index`` (0-based): ``halves`` doubles τ for modules k ≥ K/2.

    For odd K the middle module belongs to the first half (k < K/2 with k counted from 0).
    ``tau_of="second"`` reads τ as the second half's value (τ/2 for the first half, τ after), the
    authors' convention, so a τ from their command line needs no conversion.
    """
    if schedule != "halves":
        return tau
    first = tau if tau_of == "first" else tau / 2
    return 2.0 * first if index >= num_modules / 2 else first


class LocalObjective:
    """Combines CE and kinetic energy for one module and keeps its λ state (adaptive schedule).

    The λ update follows the method of multipliers of the paper: after step i with i mod s = 0,
    λ_{i+1} = λ_i + h·L(θ_{i+1}, x_{i+1}); the CE of step i+1 is computed first, then λ is
    updated, then the loss of step i+1 is formed with the new λ. λ stays on the device so the
    update costs no host synchronisation.
    """

    def __init__(self, cfg: TrglConfig, index: int, num_modules: int, device: torch.device) -> None:
        self.enabled = cfg.enabled
        self.adaptive = cfg.enabled and cfg.tau_schedule == "adaptive"
        self.tau = tau_for_module(index, num_modules, cfg.tau, cfg.tau_schedule, cfg.halves_tau_of)
        self.h = cfg.h
        self.s = cfg.s
        self.lam = torch.tensor(float(cfg.lambda_init), device=device)
        self.num_steps = 0
        # data-parallel replicas average the CE that updates λ, so λ stays equal on all of them
        self.average: Callable[[Tensor], Tensor] = lambda t: t

    def __call__(self, ce: Tensor, kinetic: Tensor) -> Tensor:
        """The loss to backpropagate at this training step."""
        self.num_steps += 1
        if not self.enabled:
            return ce
        if self.adaptive:
            if self.num_steps > 1 and (self.num_steps - 1) % self.s == 0:
                self.lam.add_(self.average(ce.detach().float()), alpha=self.h)
            return ce + kinetic * self.lam.reciprocal()
        return ce + kinetic / (2.0 * self.tau)  # rounded as the authors' loss

    def describe(self) -> dict[str, float | None]:
        """τ or λ for logs and the summary (one host sync for λ)."""
        if not self.enabled:
            return {"tau": None, "lambda": None}
        if self.adaptive:
            return {"tau": None, "lambda": float(self.lam)}
        return {"tau": self.tau, "lambda": None}

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam.detach().cpu(), "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam.copy_(state["lam"])
        self.num_steps = int(state["num_steps"])


class TrglObjective(LocalObjective, Objective):
    """L_k = CE + C_k / (2 τ_k) (or C_k / λ_k); with the transport term disabled, VanGL, which is
    also the end-to-end loss the delayed-gradient regimes train (they call it as ``(ce, kinetic)``).

    Built as every objective is, ``TrglObjective(spec, **settings)``: its settings are the ``trgl``
    section's keys (a section of its own, because the module bodies read ``trgl.reduction`` too).
    """

    regimes: ClassVar[tuple[str, ...]] = ("e2e", "parallel", "sequential", "multilap", "ddg", "fr")
    label = "TRGL"

    def __init__(self, spec: ModuleSpec, **settings: Any) -> None:
        Objective.__init__(self)
        cfg = TrglConfig(**settings)
        LocalObjective.__init__(self, cfg, spec.index, spec.num_modules, torch.device(spec.device))
        self.name = "trgl" if self.enabled else "vangl"
        self.schedule = cfg.tau_schedule

    @property
    def uses_kinetic(self) -> bool:  # type: ignore[override]
        return self.enabled

    def loss(self, inputs: LocalInputs) -> Tensor:
        return self(inputs.ce, inputs.kinetic)

    def describe(self) -> dict[str, Any]:
        label = "VanGL" if not self.enabled else f"TRGL ({self.schedule})"
        return {**LocalObjective.describe(self), "method": self.name, "label": label}


class VanglObjective(TrglObjective):
    """Plain greedy training: cross-entropy through F_k only (TRGL with the transport term off)."""

    def __init__(self, spec: ModuleSpec) -> None:
        settings = dataclasses.asdict(TrglConfig(enabled=False))
        super().__init__(spec, **settings)
