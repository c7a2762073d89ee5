"""trgl_pipe: module-wise training with the TRGL transport regularization, as a lock-free pipeline.

The public API (everything else is private and may change):

- :func:`train`: run a config, optionally with your own network and data, in one process or
  under torchrun; returns the summary. :func:`build_config`: the validated config it would run.
- :class:`Network` and :class:`Residual`: what a ``model.arch`` builder returns and builds its
  blocks from (see docs/your-own-network.md).
- :class:`Objective`, :class:`ModuleSpec`, :class:`LocalInputs`: what an ``objective.name``
  class subclasses, is built from, and computes its loss from (docs/your-own-objective.md).
- :func:`load_config` and :class:`Config`: the typed, validated configuration.
- :class:`UserError`: raised for bad input, with a one-line message.

The names are imported on first use, so ``trgl_pipe.config`` alone stays light (no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trgl_pipe.api import build_config, train
    from trgl_pipe.config import Config, load_config
    from trgl_pipe.errors import UserError
    from trgl_pipe.models.user import Network, Residual
    from trgl_pipe.objectives.base import LocalInputs, ModuleSpec, Objective

__version__ = "0.1.0"

_PUBLIC = {
    "Config": "trgl_pipe.config",
    "LocalInputs": "trgl_pipe.objectives.base",
    "ModuleSpec": "trgl_pipe.objectives.base",
    "Objective": "trgl_pipe.objectives.base",
    "Network": "trgl_pipe.models.user",
    "Residual": "trgl_pipe.models.user",
    "UserError": "trgl_pipe.errors",
    "build_config": "trgl_pipe.api",
    "load_config": "trgl_pipe.config",
    "train": "trgl_pipe.api",
}

__all__ = [
    "Config",
    "LocalInputs",
    "ModuleSpec",
    "Network",
    "Objective",
    "Residual",
    "UserError",
    "build_config",
    "load_config",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'trgl_pipe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
