"""Initial weights from a file (``model.init_state``): start any run from given weights.

The file is ``{"modules": [{"body": state_dict, "head": state_dict}, ...]}``, one entry per module
in order, with the state_dict keys of trgl_pipe's module bodies and heads (what
:func:`save_initial_state` writes from built stages). A comparison with another code base writes
that code's initial weights in this layout once, and both runs then start from the same floats
(experiments/parity_authors.py does so).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trgl_pipe.errors import ConfigError


def save_initial_state(path: str | Path, modules: Sequence[tuple[nn.Module, nn.Module]]) -> None:
    """Write the (body, head) pairs of every module in the layout ``model.init_state`` reads."""
    state = {"modules": [{"body": b.state_dict(), "head": h.state_dict()} for b, h in modules]}
    torch.save(state, path)


def read_initial_state(path: str) -> list[dict[str, Any]]:
    """The per-module entries of an initial-state file, or a ConfigError naming the key."""
    key = f"model.init_state={path}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise ConfigError(f"{key}: no such file") from error
    except Exception as error:
        raise ConfigError(f"{key}: not a readable weights file ({type(error).__name__})") from error
    modules = state.get("modules") if isinstance(state, dict) else None
    if not isinstance(modules, list) or not all(
        isinstance(m, dict) and {"body", "head"} <= m.keys() for m in modules
    ):
        raise ConfigError(
            f"{key}: expected {{'modules': [{{'body': ..., 'head': ...}}, ...]}}, one entry per module "
            "(trgl_pipe.models.initial_state.save_initial_state writes it)"
        )
    return modules


def load_initial_state(path: str, index: int, num_modules: int, body: nn.Module, head: nn.Module) -> None:
    """Copy module ``index``'s weights and buffers from ``path`` into its body and head."""
    modules = read_initial_state(path)
    if len(modules) != num_modules:
        raise ConfigError(
            f"model.init_state={path}: holds {len(modules)} modules, the run has {num_modules}; "
            "write it for the same model.num_modules and split"
        )
    for part, module in (("body", body), ("head", head)):
        own = module.state_dict()
        given = modules[index][part]
        missing = sorted(set(own) - set(given))
        extra = sorted(set(given) - set(own))
        wrong = [k for k in own if k in given and tuple(given[k].shape) != tuple(own[k].shape)]
        if missing or extra or wrong:
            first = (missing or extra or wrong)[0]
            raise ConfigError(
                f"model.init_state={path}: module {index} {part} does not match this model "
                f"({len(missing)} keys missing, {len(extra)} unknown, {len(wrong)} of another shape, "
                f"e.g. {first}); write it from the same preset"
            )
        module.load_state_dict(given)
