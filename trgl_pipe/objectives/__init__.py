"""Local objectives as plug-ins: ``objective.name`` picks one, :func:`build_objective` builds it for
module k. Each is an :class:`Objective` (see :mod:`trgl_pipe.objectives.base`)."""

from __future__ import annotations

import torch

from trgl_pipe.config import Config
from trgl_pipe.errors import ConfigError
from trgl_pipe.objectives.base import LocalInputs, ModuleSpec, Objective
from trgl_pipe.objectives.infopro import InfoProObjective
from trgl_pipe.objectives.predsim import PredSimObjective
from trgl_pipe.objectives.trgl import TrglObjective
from trgl_pipe.plugins import call_user, load_callable

__all__ = [
    "OBJECTIVES",
    "LocalInputs",
    "ModuleSpec",
    "Objective",
    "build_objective",
    "needs_image",
    "objective_class",
]

# objective.name -> the class that implements it (its declarations: regimes, needs_image, ...)
OBJECTIVES: dict[str, type[Objective]] = {
    "trgl": TrglObjective,
    "vangl": TrglObjective,
    "infopro": InfoProObjective,
    "infopro_l": InfoProObjective,
    "predsim": PredSimObjective,
}


def objective_class(cfg: Config) -> type[Objective]:
    """The class ``objective.name`` names: a built-in's, or the user's ``pkg.module:Class`` (a
    subclass of :class:`Objective`, whose class attributes declare what it needs and supports)."""
    name = cfg.objective.name
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    found = load_callable("objective.name", name)
    if not (isinstance(found, type) and issubclass(found, Objective)):
        what = found.__name__ if isinstance(found, type) else f"a {type(found).__name__}"
        raise ConfigError(
            f"objective.name={name} is {what}, not a subclass of trgl_pipe.Objective; name the class "
            "(its class attributes declare what it needs: needs_image, regimes)"
        )
    if not isinstance(found.needs_image, bool) or not isinstance(found.regimes, tuple):
        raise ConfigError(
            f"objective.name={name}: needs_image must be a bool and regimes a tuple of regimes, as class "
            "attributes (they are read before any module is built)"
        )
    return found


def build_objective(cfg: Config, spec: ModuleSpec, device: torch.device) -> Objective:
    """The objective ``cfg.objective.name`` for the module ``spec`` describes."""
    name = cfg.objective.name
    if name not in OBJECTIVES:  # the user's class: Class(spec, **objective.kwargs)
        cls = objective_class(cfg)
        built = call_user("objective.name", name, cls, spec=spec, **cfg.objective.kwargs)
        if not isinstance(built, Objective):
            raise ConfigError(f"objective.name={name} built a {type(built).__name__}, not an Objective")
        return built
    if name == "trgl":
        return TrglObjective(cfg.trgl, spec, device)
    if name == "vangl":
        return TrglObjective(cfg.trgl.__class__(enabled=False), spec, device)
    if name in ("infopro", "infopro_l"):
        return InfoProObjective(cfg.objective, spec, "image" if name == "infopro" else "input")
    return PredSimObjective(cfg.objective, spec)


def needs_image(cfg: Config, index: int, num_modules: int) -> bool:
    """Whether module ``index`` reads the batch's image: InfoPro's modules before the last, every
    module of a user's objective that declares ``needs_image`` (not in end-to-end training)."""
    if cfg.train.regime == "e2e":
        return False
    if cfg.objective.name in OBJECTIVES:
        return cfg.objective.name == "infopro" and index < num_modules - 1
    return objective_class(cfg).needs_image
