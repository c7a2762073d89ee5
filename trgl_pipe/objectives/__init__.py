"""Local objectives as plug-ins: ``objective.name`` picks one, :func:`build_objective` builds it for
module k. Each is an :class:`Objective` (see :mod:`trgl_pipe.objectives.base`)."""

from __future__ import annotations

import torch

from trgl_pipe.config import Config
from trgl_pipe.objectives.base import LocalInputs, ModuleSpec, Objective
from trgl_pipe.objectives.infopro import InfoProObjective
from trgl_pipe.objectives.predsim import PredSimObjective
from trgl_pipe.objectives.trgl import TrglObjective

__all__ = [
    "OBJECTIVES",
    "LocalInputs",
    "ModuleSpec",
    "Objective",
    "build_objective",
    "needs_image",
]

# objective.name -> the class that implements it (its declarations: regimes, needs_image, ...)
OBJECTIVES: dict[str, type[Objective]] = {
    "trgl": TrglObjective,
    "vangl": TrglObjective,
    "infopro": InfoProObjective,
    "infopro_l": InfoProObjective,
    "predsim": PredSimObjective,
}


def build_objective(cfg: Config, spec: ModuleSpec, device: torch.device) -> Objective:
    """The objective ``cfg.objective.name`` for the module ``spec`` describes."""
    name = cfg.objective.name
    if name == "trgl":
        return TrglObjective(cfg.trgl, spec, device)
    if name == "vangl":
        return TrglObjective(cfg.trgl.__class__(enabled=False), spec, device)
    if name in ("infopro", "infopro_l"):
        return InfoProObjective(cfg.objective, spec, "image" if name == "infopro" else "input")
    return PredSimObjective(cfg.objective, spec)


def needs_image(cfg: Config, index: int, num_modules: int) -> bool:
    """Whether module ``index`` reads the batch's image (InfoPro's modules before the last)."""
    return cfg.objective.name == "infopro" and index < num_modules - 1 and cfg.train.regime != "e2e"
