"""Local objectives as plug-ins, one door for all: ``objective.name`` is an import path
``pkg.module:Class`` (a subclass of :class:`Objective`) or the short name of a built-in, which is
nothing but the import path in :data:`BUILT_IN`. Each module's objective is ``Class(spec,
**kwargs)``: the built-ins are written and built exactly as a user's objective is."""

from __future__ import annotations

import dataclasses
from typing import Any

from trgl_pipe.config import Config
from trgl_pipe.errors import ConfigError
from trgl_pipe.objectives.base import LocalInputs, ModuleSpec, Objective
from trgl_pipe.plugins import call_user, load_callable

__all__ = [
    "BUILT_IN",
    "LocalInputs",
    "ModuleSpec",
    "Objective",
    "build_objective",
    "needs_image",
    "objective_class",
    "objective_kwargs",
]

# the built-in objectives' short names: import paths like any user's
BUILT_IN: dict[str, str] = {
    "trgl": "trgl_pipe.objectives.trgl:TrglObjective",
    "vangl": "trgl_pipe.objectives.trgl:VanglObjective",
    "infopro": "trgl_pipe.objectives.infopro:InfoProObjective",
    "infopro_l": "trgl_pipe.objectives.infopro:InfoProLObjective",
    "predsim": "trgl_pipe.objectives.predsim:PredSimObjective",
    "auglocal": "trgl_pipe.objectives.auglocal:AugLocalObjective",
    "man": "trgl_pipe.objectives.man:ManObjective",
    "hpff": "trgl_pipe.objectives.hpff:HpffObjective",
}


def objective_class(cfg: Config) -> type[Objective]:
    """The class ``objective.name`` names, whose class attributes declare what it needs and
    supports (read before any module is built)."""
    name = cfg.objective.name
    found = load_callable("objective.name", BUILT_IN.get(name, name))
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


def objective_kwargs(cfg: Config) -> dict[str, Any]:
    """What each module's objective is built with: ``objective.kwargs``; TRGL's are the ``trgl``
    section (a section of its own because the module bodies read ``trgl.reduction`` too)."""
    if cfg.objective.name == "trgl":
        return dataclasses.asdict(cfg.trgl)
    return dict(cfg.objective.kwargs)


def build_objective(cfg: Config, spec: ModuleSpec) -> Objective:
    """The objective ``cfg.objective.name`` for the module ``spec`` describes: ``Class(spec, **kwargs)``."""
    name = cfg.objective.name
    built = call_user("objective.name", name, objective_class(cfg), spec=spec, **objective_kwargs(cfg))
    if not isinstance(built, Objective):
        raise ConfigError(f"objective.name={name} built a {type(built).__name__}, not an Objective")
    return built


def needs_image(cfg: Config, index: int, num_modules: int) -> bool:
    """Whether module ``index`` reads the batch's image, as its objective's class declares (not in
    end-to-end training, where the network is one module)."""
    if cfg.train.regime == "e2e":
        return False
    return objective_class(cfg).reads_image(index, num_modules)
