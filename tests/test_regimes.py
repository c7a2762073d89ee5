"""Every regime trains (single process), and the simulated pipeline equals the parallel regime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trgl_pipe.training.single import run_single
from trgl_pipe.watch.metrics import read_metrics


def _train_losses(out_dir: str) -> dict[int, list[float]]:
    losses: dict[int, list[float]] = {}
    for event in read_metrics(Path(out_dir) / "metrics.jsonl"):
        if event["event"] == "train":
            losses.setdefault(event["module"], []).append(event["ce"])
    return losses


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["train.regime=e2e", "trgl.enabled=false"],
        ["train.regime=parallel"],
        ["train.regime=parallel", "trgl.enabled=false"],
        ["train.regime=parallel", "trgl.tau_schedule=adaptive", "trgl.lambda_init=20000", "trgl.s=3"],
        ["train.regime=sequential", "train.epochs=2"],
        ["train.regime=multilap", "train.epochs=2", "train.laps=2"],
    ],
    ids=["e2e", "parallel-trgl", "parallel-vangl", "parallel-adaptive", "sequential", "multilap"],
)
def test_every_regime_lowers_the_training_loss(tiny, overrides: list[str]) -> None:
    cfg = tiny("train.epochs=3", "data.train_size=1200", "model.width=8", "log.every_steps=5", *overrides)
    summary = run_single(cfg, console_summary=False)
    losses = _train_losses(cfg.out_dir)
    expected_modules = 1 if cfg.train.regime == "e2e" else 2
    assert sorted(losses) == list(range(expected_modules))
    for module, values in losses.items():
        assert values[-1] < values[0] - 0.2, f"module {module} did not learn: {values}"
    assert summary["regime"] == cfg.train.regime
    assert all(m["test_accuracy"] > 0.3 for m in summary["modules"])


def test_summary_follows_the_schema(tiny) -> None:
    cfg = tiny("model.num_modules=3", "trgl.tau_schedule=halves")
    summary = run_single(cfg, console_summary=False)
    on_disk = json.loads((Path(cfg.out_dir) / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in (
        "regime",
        "num_modules",
        "world_size",
        "epochs",
        "wall_time_s",
        "samples_per_s",
        "best_module",
        "best_test_accuracy",
        "modules",
        "ranks",
        "partition",
        "versions",
    ):
        assert key in on_disk, key
    assert on_disk["num_modules"] == 3 and on_disk["world_size"] == 1
    modules = on_disk["modules"]
    assert [m["index"] for m in modules] == [0, 1, 2]
    assert [m["tau"] for m in modules] == [10000.0, 10000.0, 20000.0]  # halves, K=3
    for m in modules:
        for key in ("val_accuracy", "test_accuracy", "kinetic_energy", "num_params", "blocks"):
            assert m[key] is not None, key
    best = on_disk["best_module"]
    assert modules[best]["val_accuracy"] == max(m["val_accuracy"] for m in modules)
    assert on_disk["best_test_accuracy"] == modules[best]["test_accuracy"]
    assert (Path(cfg.out_dir) / "config.yaml").is_file()


def test_simulated_pipeline_computes_what_the_parallel_regime_computes(tiny) -> None:
    sync = tiny("model.num_modules=3")
    sim = tiny("model.num_modules=3", "pipeline.transport=sim", "pipeline.buffer_size=2")
    a = run_single(sync, console_summary=False)
    b = run_single(sim, console_summary=False)
    assert _train_losses(sync.out_dir) == _train_losses(sim.out_dir)  # every step, every module, bitwise
    assert [m["test_accuracy"] for m in a["modules"]] == [m["test_accuracy"] for m in b["modules"]]
    assert b["transport"] == "sim" and len(b["ranks"]) == 3
    for k in range(3):
        sa = torch.load(Path(sync.out_dir) / "checkpoints/0000000010" / f"module-{k}.pt", weights_only=True)
        sb = torch.load(Path(sim.out_dir) / "checkpoints/0000000010" / f"module-{k}.pt", weights_only=True)
        for name, tensor in sa["stage"]["body"].items():
            assert torch.equal(tensor, sb["stage"]["body"][name]), name
