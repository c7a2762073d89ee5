"""Which combinations of regime, objective, network, layout and precision a run accepts: one place.

:func:`check` takes a validated config (each key already in its own range) and raises the one-line
:class:`~trgl_pipe.errors.ConfigError` of the first rule it breaks, before anything is read or
written; ``Config`` calls it last. The objective's own declarations decide what it supports
(:attr:`trgl_pipe.objectives.Objective.regimes`), not its name. docs/compatibility.md holds the
table of regime × objective this gives, and a test checks the table against this function.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from trgl_pipe.errors import ConfigError

if TYPE_CHECKING:
    from trgl_pipe.config import Config

DELAYED = ("ddg", "fr")


def _kwargs_of(cls: type) -> list[str] | None:
    """The keyword arguments ``cls(spec, ...)`` takes; None when it takes any (``**kwargs``)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [p for p in params if p not in ("self", "spec")]


def check(cfg: Config) -> None:
    """Raise the one-line refusal of the first rule ``cfg`` breaks; return if it breaks none."""
    refusal = refusal_of(cfg)
    if refusal is not None:
        raise ConfigError(refusal)


def refusal_of(cfg: Config) -> str | None:
    """The one-line refusal of the first rule ``cfg`` breaks, or None."""
    from trgl_pipe.objectives import objective_class

    regime = cfg.train.regime
    objective = objective_class(cfg)  # a user's class is imported here: a bad path is one line too
    if regime not in objective.regimes:
        why = (
            ": the delayed-gradient regimes train the end-to-end loss; use objective.name=vangl with "
            "trgl.enabled=false, or another regime"
            if regime in DELAYED
            else f"; use train.regime={objective.regimes[0]}"
            if objective.regimes
            else ""
        )
        supports = ", ".join(objective.regimes) or "no regime"
        name = cfg.objective.name
        return f"objective.name={name} does not train in train.regime={regime} (it supports {supports}){why}"
    accepted = _kwargs_of(objective) if cfg.objective.kwargs else None
    unknown = [k for k in cfg.objective.kwargs if accepted is not None and k not in accepted]
    if unknown:
        assert accepted is not None
        return (
            f"objective.kwargs: {objective.__name__} takes no {', '.join(unknown)}; it takes "
            f"{', '.join(accepted) or 'no keyword arguments'}"
        )
    objective.check_kwargs(dict(cfg.objective.kwargs), cfg.model.num_modules)  # its own refusals
    unserved = [need for need in objective.needs_from_next if need not in ("weights", "gradient")]
    if unserved:
        return (
            f"objective.name={cfg.objective.name} needs {' and '.join(unserved)} from the next module "
            "(needs_from_next): only weights and gradient are sent back; it cannot train here"
        )
    if objective.needs_from_next and cfg.pipeline.replicas > 1:
        why = (
            "adds a gradient from the next module outside the replicas' gradient average"
            if "gradient" in objective.needs_from_next
            else "takes the next module's weights, which replicas do not exchange yet"
        )
        return f"objective.name={cfg.objective.name} {why}; set pipeline.replicas=1"
    if "gradient" in objective.needs_from_next and cfg.pipeline.wire_dtype is not None:
        return (
            f"objective.name={cfg.objective.name} sends gradients back in the activations' dtype; "
            f"pipeline.wire_dtype={cfg.pipeline.wire_dtype} is not supported with it: remove it"
        )
    if cfg.pipeline.wire_dtype is not None and regime != "parallel":
        return (
            f"pipeline.wire_dtype={cfg.pipeline.wire_dtype} applies to train.regime=parallel (the pipeline "
            f"and its one-process reference), not to {regime}; remove it"
        )
    if cfg.pipeline.transport != "auto" and regime != "parallel":
        return (
            f"pipeline.transport={cfg.pipeline.transport} runs the parallel regime only "
            f"(train.regime is {regime}); set train.regime=parallel or pipeline.transport=auto"
        )
    if objective.needs_feature_maps and cfg.model.arch.startswith("swin"):
        return (
            f"objective.name={cfg.objective.name} needs feature maps; {cfg.model.arch}'s modules output "
            "token maps: use a CNN backbone, or another objective"
        )
    if cfg.aux.type != "conv" and cfg.model.arch.startswith("swin"):
        return (
            f"aux.type={cfg.aux.type} is a head for CNN feature maps; {cfg.model.arch}'s modules "
            "output token maps: use aux.type=conv"
        )
    if regime in DELAYED and cfg.train.compile:
        return (
            f"train.regime={regime} does not support train.compile=true yet (its delayed "
            "backward runs the module on saved weights); set train.compile=false"
        )
    if regime in DELAYED and cfg.trgl.enabled:
        return (
            f"train.regime={regime} trains the end-to-end objective (one loss, at the last "
            "head); set trgl.enabled=false"
        )
    if regime not in ("parallel", *DELAYED) and cfg.pipeline.replicas > 1:
        return (
            f"pipeline.replicas={cfg.pipeline.replicas} applies to the pipeline (train.regime=parallel, "
            f"ddg or fr under torchrun), not to train.regime={regime}; remove it"
        )
    r = cfg.pipeline.replicas
    if r > 1 and cfg.data.batch_size < r:
        return (
            f"data.batch_size={cfg.data.batch_size} is smaller than pipeline.replicas={r}: each replica "
            f"trains on a shard of the batch, and {r - cfg.data.batch_size} would get none; "
            f"raise data.batch_size to {r} or more (it is the global batch, split over the replicas)"
        )
    k, m = cfg.model.num_modules, cfg.pipeline.modules_per_rank
    if k % m:
        return (
            f"pipeline.modules_per_rank={m} does not divide model.num_modules={k}; use a divisor of {k} "
            f"({', '.join(str(d) for d in range(1, k + 1) if k % d == 0)})"
        )
    return None


def unused_keys(cfg: Config, given: set[str]) -> list[str]:
    """The keys in ``given`` (dotted, as the user set them) that this run never reads, each with
    why: for the one-line warning :func:`warn_unused` gives."""
    found = []
    name, regime = cfg.objective.name, cfg.train.regime
    trgl_reads = name == "trgl" and regime not in DELAYED
    for key in sorted(given):
        section, _, field = key.partition(".")
        if _is_default(cfg, section, field):
            continue  # a config.yaml a run wrote holds every key: only a changed value was meant
        if section == "trgl" and field not in ("reduction", "enabled") and not trgl_reads:
            why = (
                f"train.regime={regime} trains the end-to-end loss, without the transport term"
                if regime in DELAYED
                else f"objective.name={name} does not read the trgl section"
            )
            found.append(f"{key} ({why})")
        elif section == "trgl" and field == "enabled" and name not in ("trgl", "vangl"):
            found.append(f"{key} (objective.name={name} decides the loss itself)")
        elif key == "train.laps" and regime != "multilap":
            found.append(f"{key} (train.regime={regime}; laps are multilap's)")
        elif key == "train.delays" and regime not in DELAYED:
            found.append(f"{key} (train.regime={regime}; delays are ddg's and fr's)")
        elif key in ("aux.depth", "aux.expand") and cfg.aux.type != "sedona":
            found.append(f"{key} (aux.type={cfg.aux.type}; depth and expand are SEDONA's head's)")
    return found


def _is_default(cfg: Config, section: str, field: str) -> bool:
    import dataclasses

    owner = getattr(cfg, section, None)
    if not dataclasses.is_dataclass(owner):
        return False
    fields = {f.name: f for f in dataclasses.fields(owner)}
    spec = fields.get(field)
    if spec is None:
        return False
    if spec.default is not dataclasses.MISSING:
        default = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        default = spec.default_factory()
    else:
        return False
    return getattr(owner, field) == default


def given_keys(raw: dict) -> set[str]:
    """The dotted keys a raw config mapping sets (a section's mapping, not a key's value)."""
    return {
        f"{section}.{key}" for section, values in raw.items() if isinstance(values, dict) for key in values
    }


def warn_unused(cfg: Config, raw: dict) -> None:
    """One warning line naming every key ``raw`` sets that the run never reads."""
    import warnings

    from trgl_pipe.errors import UnusedKeyWarning

    unused = unused_keys(cfg, given_keys(raw))
    if unused:
        warnings.warn(f"set but not used: {'; '.join(unused)}", UnusedKeyWarning, stacklevel=3)
