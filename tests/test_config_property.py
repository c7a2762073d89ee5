"""Every key of every config section, drawn from its own type: a run ends with exit 0, or with
exactly one ``error:`` line, no traceback and nothing written when refused.

Values come from the config dataclasses' own type hints (a Literal's choices, booleans, small
integers and floats, null where allowed) and from a fixed set of bad ones (other types, negative,
huge, unparsable). Each example overrides one or two keys of a tiny one-step run, in this
process (a CLI start costs seconds; ``trgl_pipe.run.main`` is what the CLI calls). Keys whose
valid values would start other programs, read other files or train for long get bad values only.
The examples are derandomized, so CI draws the same ones every time.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trgl_pipe.config import Config
from trgl_pipe.run import main

BASE = [
    "data.source=embedded",
    "data.train_size=64",
    "data.val_size=32",
    "data.test_size=32",
    "data.batch_size=32",
    "data.eval_batch_size=32",
    "model.depth=8",
    "model.width=4",
    "model.num_modules=2",
    "train.epochs=1",
    "train.max_steps=1",
    "train.num_threads=1",
    "log.live=off",
    "checkpoint.every_epochs=0",
]
# valid values of these would download, read files, start torchrun, compile, open W&B, inject
# faults or train for long: they are drawn with bad values only
BAD_ONLY = {
    "data.name", "data.source", "data.root", "data.kwargs", "data.cache_dir", "data.train_size",
    "data.val_size", "data.test_size", "data.num_workers", "data.image_size", "model.arch",
    "model.arch_kwargs", "model.depth", "model.width", "model.init_from", "model.init_state",
    "model.num_modules", "model.split", "aux.head", "aux.head_kwargs", "train.epochs",
    "train.max_steps", "train.compile", "train.regime", "train.laps", "pipeline.transport",
    "pipeline.backend", "pipeline.replicas", "pipeline.modules_per_rank", "log.tensorboard",
    "log.wandb", "log.dir", "debug", "device", "out_dir", "resume", "overwrite", "seed",
    "checkpoint.dir", "objective.name",
}  # fmt: skip
BAD = ["abc", "-1", "1e23", "99999999999999999999999", "[1, 2", "{", "''", "nan", "-0.5", "[]", "{a: 1}"]


def _leaf_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every ``section.key`` of the config with its type hint."""
    found: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            found.update(_leaf_types(hint, f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = hint
    return found


KEYS = _leaf_types(Config)


def _valid(hint: Any) -> st.SearchStrategy[str] | None:
    """Values of ``hint`` as override text, or None for a type drawn with bad values only."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return st.sampled_from([str(a).lower() if isinstance(a, bool) else str(a) for a in args])
    if origin in (typing.Union, types.UnionType):
        options = [s for s in (_valid(a) for a in args if a is not type(None)) if s is not None]
        if type(None) in args:
            options.append(st.just("null"))
        return st.one_of(options) if options else None
    if hint is bool:
        return st.sampled_from(["true", "false"])
    if hint is int:
        return st.integers(0, 4).map(str)
    if hint is float:
        return st.floats(0.0, 2.0, allow_nan=False).map(lambda v: f"{v:.3g}")
    return None


def _override(key: str) -> st.SearchStrategy[str]:
    hint = KEYS[key]
    valid = None if key in BAD_ONLY or key.split(".")[0] in BAD_ONLY else _valid(hint)
    bad = st.sampled_from(BAD)
    values = bad if valid is None else st.one_of(valid, bad)
    return values.map(lambda value: f"{key}={value}")


OVERRIDES = st.lists(st.sampled_from(sorted(KEYS)).flatmap(_override), min_size=1, max_size=2)


@pytest.fixture
def torch_state():
    """A run in this process sets threads and deterministic algorithms: restore them after."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(overrides=OVERRIDES)
def test_any_value_of_any_key_runs_or_is_refused_in_one_line(
    overrides: list[str], tmp_path: Path, capsys, torch_state
) -> None:
    out = tmp_path / f"run-{abs(hash(tuple(overrides)))}"
    code = main([*BASE, *overrides, f"out_dir={out}"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, (overrides, captured.err[-2000:])
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    if code == 0:
        assert errors == [] and (out / "summary.json").is_file(), (overrides, captured.err[-2000:])
        return
    assert code in (2, 3), (overrides, code, captured.err[-2000:])  # bad input; a non-finite loss
    assert len(errors) == 1 and len(errors[0]) < 600, (overrides, captured.err[-2000:])
    if code == 2:  # refused: nothing written
        assert not out.exists() or not any(out.iterdir()), (overrides, sorted(out.rglob("*")))
