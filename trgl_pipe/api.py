"""The Python API: ``trgl_pipe.train(config, model=..., data=..., **overrides)``.

The same script runs in one process (``python my_script.py``) or as a pipeline
(``torchrun --nproc_per_node=K my_script.py``): every rank calls :func:`train` with the same
arguments, builds the same network and trains its own modules.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from trgl_pipe.compatibility import warn_unused
from trgl_pipe.config import Config, from_dict, read_yaml_mapping
from trgl_pipe.errors import ConfigError
from trgl_pipe.models.user import Network
from trgl_pipe.plugins import register_object

ConfigLike = Config | Mapping[str, Any] | str | Path | None


def _raw_config(config: ConfigLike) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Config):
        return config.to_dict()
    if isinstance(config, (str, Path)):
        return read_yaml_mapping(Path(config))
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    raise ConfigError(f"config must be a YAML path, a mapping or a Config, got {type(config).__name__}")


def _merge(raw: dict[str, Any], key: str, value: Any) -> None:
    """``section={...}`` merges into the section; ``key`` or ``"section.key"`` sets one value."""
    if isinstance(value, Mapping) and "." not in key and isinstance(raw.get(key, {}), dict):
        section = raw.setdefault(key, {})
        for k, v in value.items():
            section[k] = v
        return
    node = raw
    *sections, last = key.split(".")
    for part in sections:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[last] = value


def _plugin(obj: Any, what: str) -> str:
    """An import path for ``obj``: itself if a string, else the registered callable."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, (nn.Module, Network)) or (what == "data" and isinstance(obj, (tuple, list))):
        fixed = obj  # a built network or (train, test): every call returns a fresh copy

        def provide(**_: Any) -> Any:
            return copy.deepcopy(fixed)

        provide.__qualname__ = f"{what}_object_{id(fixed):x}"
        return register_object(provide)
    if not callable(obj):
        raise ConfigError(
            f"{what}= must be a callable or an import path 'pkg.mod:callable', got {type(obj).__name__}"
        )
    return register_object(obj)


def build_config(
    config: ConfigLike = None,
    *,
    model: Callable[..., Any] | nn.Module | Network | Mapping[str, Any] | str | None = None,
    data: Callable[..., Any] | str | Any = None,
    head: Callable[..., nn.Module] | str | None = None,
    objective: type | str | None = None,
    **overrides: Any,
) -> Config:
    """The validated :class:`Config` that :func:`train` runs (see there for the arguments)."""
    raw = _raw_config(config)
    # model= and data= name the plug-ins; a mapping there is the section's keys instead
    if isinstance(model, Mapping):
        overrides = {"model": model, **overrides}
        model = None
    if isinstance(data, Mapping):
        overrides = {"data": data, **overrides}
        data = None
    for key, value in overrides.items():
        _merge(raw, key, value)
    if model is not None:
        raw.setdefault("model", {})["arch"] = _plugin(model, "model")
    if data is not None:
        raw.setdefault("data", {})["name"] = _plugin(data, "data")
    if head is not None:
        raw.setdefault("aux", {})["head"] = _plugin(head, "head")
    if objective is not None:
        raw.setdefault("objective", {})["name"] = _plugin(objective, "objective")
    cfg = from_dict(Config, raw, "")
    warn_unused(cfg, raw)
    return cfg


def train(
    config: ConfigLike = None,
    *,
    model: Callable[..., Any] | nn.Module | Network | Mapping[str, Any] | str | None = None,
    data: Callable[..., Any] | str | Any = None,
    head: Callable[..., nn.Module] | str | None = None,
    objective: type | str | None = None,
    **overrides: Any,
) -> dict[str, Any] | None:
    """Train as the config says and return the run's summary (what summary.json holds).

    ``config``: a YAML path, a mapping of sections, a :class:`Config` or None (defaults).
    ``model``: a builder ``f(input_shape, num_classes, **model.arch_kwargs)`` returning an
    ``nn.Sequential`` of blocks or a :class:`trgl_pipe.Network` (or an import path to one, or a
    built network, copied as it is). ``data``: a callable returning ``(train, test)`` (Datasets
    or ``(images, labels)`` arrays), an import path, or that pair itself. ``head``: an auxiliary
    head builder ``f(shape, num_classes, module, num_modules)``. ``objective``: a subclass of
    :class:`trgl_pipe.Objective` (or its import path), built as ``Objective(spec, **objective.kwargs)``
    for each module (docs/your-own-objective.md). ``overrides``: ``train={"epochs":
    2}`` merges into a section, ``seed=1`` sets a top-level key, ``**{"trgl.tau": 1e4}`` one key
    (a mapping given as ``model=`` or ``data=`` is that section's keys, not a plug-in).

    Under torchrun every rank calls this with the same arguments; rank 0 (and any rank that sees
    ``out_dir``) returns the summary, and a failing pipeline ends the process with one line and
    the exit code of the CLI. Bad input raises :class:`trgl_pipe.errors.UserError`.
    """
    cfg = build_config(config, model=model, data=data, head=head, objective=objective, **overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.pipeline.transport == "dist":
        from trgl_pipe.training.rank import run_rank

        return run_rank(cfg, exit_process=False)
    from trgl_pipe.training.single import run_single

    return run_single(cfg)


__all__ = ["build_config", "train"]
