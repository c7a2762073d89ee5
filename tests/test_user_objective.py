"""A local objective of the user's own (tests/user_pkg/objectives.py), by import path and through
``trgl_pipe.train``: every regime it declares, its state in checkpoints, its refusals in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import final_stage_states

import trgl_pipe
from tests.user_pkg.objectives import Distill
from trgl_pipe.config import load_config
from trgl_pipe.errors import ConfigError
from trgl_pipe.run import main
from trgl_pipe.training.single import run_single

DISTILL = "tests.user_pkg.objectives:Distill"
SMALL = [
    "data.source=embedded",
    "data.train_size=128",
    "data.val_size=64",
    "data.test_size=64",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "model.depth=8",
    "model.width=4",
    "model.num_modules=2",
    "train.epochs=2",
    "train.num_threads=1",
    "log.live=off",
    "log.every_steps=1",
    f"objective.name={DISTILL}",
    "objective.kwargs={weight: 0.5, width: 6}",
]


@pytest.mark.parametrize("regime", ["parallel", "sequential", "multilap", "e2e"])
def test_every_regime_it_declares_trains_it(tmp_path: Path, regime: str) -> None:
    extra = ["train.laps=2"] if regime == "multilap" else []
    cfg = load_config(None, [*SMALL, f"train.regime={regime}", *extra, f"out_dir={tmp_path}"])
    summary = run_single(cfg, console_summary=False)
    k = 1 if regime == "e2e" else 2
    assert [m["method"] for m in summary["modules"]] == ["distill(weight=0.5)"] * k  # its describe()
    state = torch.load(sorted((tmp_path / "checkpoints").iterdir())[-1] / "module-0.pt", weights_only=True)[
        "stage"
    ]
    assert state["objective"]["centres"].shape == (10, 6) and state["objective"]["steps"] == 8
    assert state["objective"]["centres"].abs().sum() > 0  # it trained: the centres moved
    assert "projection.weight" in "".join(state["aux"])  # its own network was trained and saved


def test_a_resumed_run_restores_its_state_and_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    every = ["checkpoint.every_steps=3", "checkpoint.keep=100"]
    run_single(load_config(None, [*SMALL, *every, f"out_dir={tmp_path / 'a'}"]), console_summary=False)
    source = tmp_path / "a" / "checkpoints" / "0000000003"
    resumed = load_config(None, [*SMALL, f"resume={source}", f"out_dir={tmp_path / 'b'}"])
    run_single(resumed, console_summary=False)
    a, b = final_stage_states(tmp_path / "a"), final_stage_states(tmp_path / "b")
    assert sorted(a) == sorted(b) == [0, 1]
    for sa, sb in ((a[k], b[k]) for k in a):
        assert torch.equal(sa["objective"]["centres"], sb["objective"]["centres"])
        assert sa["objective"]["steps"] == sb["objective"]["steps"] == 8
        for part in ("body", "head", "aux"):
            assert all(torch.equal(t, sb[part][n]) for n, t in sa[part].items()), part


def test_train_takes_the_class_itself(tmp_path: Path) -> None:
    # the class is registered under its import path, so each rank of a torchrun script finds it
    config = load_config(None, [o for o in SMALL if not o.startswith("objective.")]).to_dict()
    summary = trgl_pipe.train(
        config, objective=Distill, out_dir=str(tmp_path), **{"objective.kwargs": {"weight": 0.5}}
    )
    assert [m["method"] for m in summary["modules"]] == ["distill(weight=0.5)"] * 2


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["objective.name=tests.user_pkg.nowhere:Distill"],
            "objective.name=tests.user_pkg.nowhere:Distill: cannot import module tests.user_pkg.nowhere",
        ),
        (
            ["objective.name=tests.user_pkg.objectives:not_a_class"],
            "objective.name=tests.user_pkg.objectives:not_a_class is a function, not a subclass of "
            "trgl_pipe.Objective; name the class",
        ),
        (
            ["objective.name=tests.user_pkg.objectives:NotAnObjective"],
            "objective.name=tests.user_pkg.objectives:NotAnObjective is NotAnObjective, not a subclass",
        ),
        (
            ["objective.kwargs={weight: 1, depth: 3}"],
            "objective.kwargs: Distill takes no depth; it takes weight, width",
        ),
        (
            ["train.regime=ddg", "trgl.enabled=false"],
            f"objective.name={DISTILL} does not train in train.regime=ddg (it supports e2e, parallel, "
            "sequential, multilap): the delayed-gradient regimes",
        ),
        (
            ["objective.name=infopro", "objective.kwargs={weight: 1}"],
            "objective.kwargs: InfoProObjective takes no weight; it takes loss, weights, widen, feature_dim, "
            "temperature",
        ),
        (["objective.name=distill"], "objective.name=distill is not an objective here; choose one of trgl"),
    ],
    ids=[
        "no-module",
        "a-function",
        "not-an-objective",
        "unknown-kwargs",
        "undeclared-regime",
        "builtin-kwargs",
        "no-such-name",
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys, overrides, line) -> None:
    out = tmp_path / "run"
    code = main([*SMALL, *overrides, f"out_dir={out}"])
    err = [e for e in capsys.readouterr().err.splitlines() if e.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert line in err[0], err[0]
    assert not out.exists()
    with pytest.raises(ConfigError):
        load_config(None, [*SMALL, *overrides])
