"""Delayed-gradient regimes (DDG, Features Replay) in one process: the papers' delays, DDG without
delays is end-to-end training, FR replays with the current weights, resume is exact."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import final_stage_states
from torch.func import functional_call

from trgl_pipe.config import Config
from trgl_pipe.context import build_context, configure_torch
from trgl_pipe.errors import ConfigError
from trgl_pipe.folder.checkpoint import CheckpointWriter, latest_complete
from trgl_pipe.folder.run_folder import claim
from trgl_pipe.runtime.mesh import LaunchEnv, check_launch
from trgl_pipe.training.delayed import DelayedModule, attach, delays_for, run_delayed
from trgl_pipe.training.single import run_single
from trgl_pipe.training.worker import make_worker
from trgl_pipe.watch.metrics import MetricsLogger

E2E = ["trgl.enabled=false", "optim.lr=0.2"]


def _recorded(cfg: Config) -> tuple[list[DelayedModule], object]:
    """Train as run_single does, keeping a record of every update."""
    configure_torch(cfg)
    with claim(cfg) as folder:
        folder.commit()
        ctx = build_context(cfg, torch.device("cpu"))
        logger = MetricsLogger(folder.out / "metrics.jsonl")
        writer = CheckpointWriter(cfg, ctx.partition, cfg.train.regime)
        workers = [make_worker(ctx.build_stage(i), cfg, logger, writer) for i in range(ctx.num_modules)]
        carries = attach(workers, cfg.train.regime, delays_for(cfg, len(workers)), record=True)
        run_delayed(ctx, workers)
        logger.close()
    return carries, ctx


def test_ddg_without_delays_equals_end_to_end_training_bitwise(tiny) -> None:
    e2e = tiny("train.regime=e2e", *E2E)
    ddg = tiny("train.regime=ddg", "train.delays=none", "model.num_modules=3", *E2E)
    summary_e2e = run_single(e2e, console_summary=False)
    summary_ddg = run_single(ddg, console_summary=False)
    whole, parts = final_stage_states(e2e.out_dir)[0], final_stage_states(ddg.out_dir)
    # the same parameters in the same order: stem and blocks of modules 0..2, then the network's head
    body = [t for k in range(3) for t in parts[k]["body"].values()]
    assert len(body) == len(whole["body"])
    for a, b in zip(whole["body"].values(), body, strict=True):
        assert torch.equal(a, b)
    for name, tensor in whole["head"].items():
        assert torch.equal(tensor, parts[2]["head"][name]), name
    assert summary_ddg["modules"][2]["test_accuracy"] == summary_e2e["modules"][0]["test_accuracy"]
    assert [m["delay"] for m in summary_ddg["modules"]] == [0, 0, 0]
    assert all(m["compute_s"] > 0 for m in summary_ddg["modules"])


@pytest.mark.parametrize("mode", ["ddg", "fr"])
def test_module_k_applies_the_gradient_of_the_batch_it_forwarded_k_minus_1_minus_k_steps_ago(
    tiny, mode
) -> None:
    cfg = tiny(f"train.regime={mode}", "model.num_modules=3", "train.epochs=2", *E2E)
    carries, ctx = _recorded(cfg)
    steps = 2 * ctx.steps_per_epoch
    for k, carry in enumerate(carries):
        delay = 2 - k
        assert carry.delay == delay
        assert [a.time for a in carry.applied] == list(range(delay, steps))
        assert [a.batch for a in carry.applied] == [t - delay for t in range(delay, steps)]
        # which weights the gradient was computed with: DDG those of the forward, FR the current ones
        expected = [
            max(0, b - delay) if mode == "ddg" else t - delay
            for t, b in ((a.time, a.batch) for a in carry.applied)
        ]
        assert [a.weights_version for a in carry.applied] == expected
        assert carry.stage.num_steps == steps - delay
        assert carry.held_batches_peak == (delay + 1 if delay else 0)
    held = [c.report()["held_bytes_peak"] for c in carries]
    assert held[2] == 0
    if mode == "fr":  # only the inputs: delay + 1 full batches of 64 (1x28x28, then 4x28x28 floats)
        assert held[:2] == [3 * 64 * 1 * 28 * 28 * 4, 2 * 64 * 4 * 28 * 28 * 4]
    else:  # graphs and weights: more than the inputs, and growing with the delay
        assert held[0] > held[1] > 2 * 64 * 4 * 28 * 28 * 4


def _module0_gradient(carry: DelayedModule, weights: list, x: torch.Tensor, grad_out: torch.Tensor) -> list:
    """An independent vector-Jacobian product of module 0 at ``weights``."""
    body = copy.deepcopy(carry.stage.body).train()
    names = [n for n, _ in body.named_parameters()]
    params = {n: w.clone().requires_grad_() for n, w in zip(names, weights, strict=True)}
    out, _ = functional_call(body, params, (x,), {"kinetic_grad": False})
    return list(torch.autograd.grad(out, list(params.values()), grad_out))


@pytest.mark.parametrize("mode", ["ddg", "fr"])
def test_fr_replays_with_the_current_weights_and_ddg_with_those_of_the_forward(tiny, mode) -> None:
    cfg = tiny(f"train.regime={mode}", "train.epochs=1", "optim.lr=0.5", *E2E)  # K=2: module 0 lags 1 step
    carries, ctx = _recorded(cfg)
    inputs = [x for x, _ in ctx.batches.train_batches(0)]
    applied = carries[0].applied
    assert len(applied) >= 3
    for i in range(1, len(applied)):
        update = applied[i]  # batch i, applied at step i + 1; weights before it: version i
        assert update.batch == i and update.grad_out is not None
        current = _module0_gradient(carries[0], update.weights, inputs[i], update.grad_out)
        stale = _module0_gradient(carries[0], applied[i - 1].weights, inputs[i], update.grad_out)
        expected, other = (current, stale) if mode == "fr" else (stale, current)
        for got, want in zip(update.grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert any(
            not torch.allclose(g, o, rtol=1e-3, atol=1e-5) for g, o in zip(update.grads, other, strict=True)
        )


@pytest.mark.parametrize("mode", ["ddg", "fr"])
def test_resumed_run_with_batches_in_flight_ends_like_an_uninterrupted_one(tiny, mode) -> None:
    regime = [f"train.regime={mode}", "model.num_modules=3", "checkpoint.every_steps=3", *E2E]
    full = tiny("checkpoint.keep=100", *regime)
    summary_full = run_single(full, console_summary=False)
    source = Path(full.out_dir) / "checkpoints" / "0000000003"  # module 0 has 2 batches in flight
    shard = torch.load(source / "module-0.pt", weights_only=True)
    assert [p["step"] for p in shard["carry"]["pending"]] == [1, 2]
    resumed = tiny(*regime, f"resume={source}")
    summary_resumed = run_single(resumed, console_summary=False)
    a, b = final_stage_states(full.out_dir), final_stage_states(resumed.out_dir)
    for k in a:
        for part in ("body", "head"):
            for name, tensor in a[k][part].items():
                assert torch.equal(tensor, b[k][part][name]), (k, part, name)
        assert a[k]["num_steps"] == b[k]["num_steps"]
    assert [m["history"] for m in summary_full["modules"]] == [
        m["history"] for m in summary_resumed["modules"]
    ]


def test_delayed_regimes_refuse_what_they_do_not_do(tiny) -> None:
    with pytest.raises(ConfigError, match=r"trgl\.enabled=false"):
        tiny("train.regime=ddg")
    with pytest.raises(ConfigError, match=r"set train\.compile=false"):
        tiny("train.regime=fr", "trgl.enabled=false", "train.compile=true")
    with pytest.raises(ConfigError, match=r"train\.delays=none applies to train\.regime=ddg or fr"):
        tiny("train.delays=none", "trgl.enabled=false")
    env = LaunchEnv(0, 4, 0, 4, "127.0.0.1", 1, 0, False)
    # replicas run (K=2 stages x R=2 on 4 ranks); across ranks the delays are the papers'
    replicated = tiny("train.regime=fr", "trgl.enabled=false", "model.num_modules=2", "pipeline.replicas=2")
    assert check_launch(replicated, env).replicas == 2
    synced = tiny(
        "train.regime=fr", *E2E, "model.num_modules=2", "pipeline.replicas=2", "pipeline.sync_batchnorm=true"
    )
    with pytest.raises(ConfigError, match=r"drop pipeline\.sync_batchnorm"):
        check_launch(synced, env)
    with pytest.raises(ConfigError, match=r"with train\.delays=paper only"):
        check_launch(tiny("train.regime=ddg", *E2E, "model.num_modules=4", "train.delays=none"), env)
    check_launch(tiny("train.regime=fr", "trgl.enabled=false", "model.num_modules=4"), env)
    two = LaunchEnv(0, 2, 0, 2, "127.0.0.1", 1, 0, False)
    check_launch(tiny("train.regime=ddg", *E2E, "model.num_modules=4", "pipeline.modules_per_rank=2"), two)


def test_sigterm_mid_epoch_checkpoints_the_batches_in_flight_and_resume_finishes_alike(
    tiny, monkeypatch
) -> None:
    from trgl_pipe.runtime import preemption
    from trgl_pipe.training.single import Preempted

    regime = ["train.regime=ddg", "model.num_modules=3", "checkpoint.every_epochs=0", *E2E]
    full = tiny(*regime)
    run_single(full, console_summary=False)
    calls = iter(range(10**6))  # asked before every batch: true from the 12th on (in epoch 1)
    monkeypatch.setattr(preemption, "requested", lambda: next(calls) >= 11)
    stopped = tiny(*regime)
    with pytest.raises(Preempted):
        run_single(stopped, console_summary=False)
    meta = json.loads((latest_complete(stopped.out_dir) / "meta.json").read_text())
    assert meta["progress"]["step"] % 5 and not meta["progress"]["final"]  # mid-epoch: batches in flight
    monkeypatch.setattr(preemption, "requested", lambda: False)
    run_single(tiny(*regime, f"out_dir={stopped.out_dir}", "resume=auto"), console_summary=False)
    a, b = final_stage_states(full.out_dir), final_stage_states(stopped.out_dir)
    for k in a:
        for name, tensor in a[k]["body"].items():
            assert torch.equal(tensor, b[k]["body"][name]), (k, name)
