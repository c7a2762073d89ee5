"""DDG and Features Replay across torchrun ranks (gloo, CPU): the backward link carries each
gradient to the rank before, and the pipeline computes bit for bit what one process computes."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY, rank_process, run_torchrun, start_torchrun

from trgl_pipe.config import load_config
from trgl_pipe.context import build_context
from trgl_pipe.data import Batches
from trgl_pipe.errors import CheckpointError
from trgl_pipe.folder.checkpoint import latest_complete
from trgl_pipe.stage import Stage
from trgl_pipe.training.single import run_single
from trgl_pipe.watch.metrics import read_metrics

pytestmark = pytest.mark.multiproc


def _common(k: int, regime: str) -> list[str]:
    return [
        *TINY,
        f"model.num_modules={k}",
        f"train.regime={regime}",
        "trgl.enabled=false",
        "optim.lr=0.2",
        "pipeline.buffer_size=2",
    ]


def _shards(out: Path, k: int) -> list[dict]:
    folder = latest_complete(out)
    return [torch.load(folder / f"module-{i}.pt", weights_only=True) for i in range(k)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    for i, (sa, sb) in enumerate(zip(a, b, strict=True)):
        for part in ("body", "head"):
            for name, tensor in sa["stage"][part].items():
                assert torch.equal(tensor, sb["stage"][part][name]), (i, part, name)
        assert sa["stage"]["num_steps"] == sb["stage"]["num_steps"]
        pa, pb = sa["carry"]["pending"], sb["carry"]["pending"]  # the batches still in flight
        assert [p["step"] for p in pa] == [p["step"] for p in pb]
        assert all(torch.equal(x["x"], y["x"]) for x, y in zip(pa, pb, strict=True))
        ga, gb = sa["carry"]["grads"], sb["carry"]["grads"]  # gradients sent, not yet applied
        assert [g[0] for g in ga] == [g[0] for g in gb]
        assert all(torch.equal(x[1], y[1]) for x, y in zip(ga, gb, strict=True))


def _losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_metrics(out / "metrics.jsonl") if e["event"] == "train"}


@pytest.mark.parametrize(
    ("k", "regime", "per_rank"),
    [(2, "ddg", 1), (4, "fr", 1), (4, "ddg", 2)],
    ids=["K2-ddg", "K4-fr", "K4-ddg-two-modules-per-rank"],
)
def test_delayed_pipeline_computes_exactly_what_one_process_computes(
    tmp_path: Path, k: int, regime: str, per_rank: int
) -> None:
    common = _common(k, regime)
    run_single(load_config(None, [*common, f"out_dir={tmp_path / 'single'}"]), console_summary=False)
    layout = f"pipeline.modules_per_rank={per_rank}"
    piped = run_torchrun(k // per_rank, [*common, f"out_dir={tmp_path / 'pipe'}", layout])
    assert piped.returncode == 0, piped.stderr[-3000:]
    a, b = _shards(tmp_path / "single", k), _shards(tmp_path / "pipe", k)
    assert [len(s["carry"]["pending"]) for s in a] == list(range(k - 1, -1, -1))  # module i lags K-1-i
    _assert_same(a, b)
    losses = _losses(tmp_path / "single")
    assert len(losses) == 10 and losses == _losses(tmp_path / "pipe")  # the last module, every step
    _assert_gradient_bytes(tmp_path / "pipe", k, per_rank)


# bytes of one sample of module m's input at TINY's depth and width (its ∂loss/∂input, float32)
INPUT_SAMPLE_BYTES = {
    (2, 1): 8 * 14 * 14 * 4,
    (4, 1): 4 * 28 * 28 * 4,
    (4, 2): 4 * 28 * 28 * 4,
    (4, 3): 8 * 14 * 14 * 4,
}


def _assert_gradient_bytes(out: Path, k: int, per_rank: int) -> None:
    """Each rank but the first sends back one gradient per update of its first module: of the
    batches 0 .. 9 - delay (TINY: 300 images a batch of 64 at a time, 2 epochs)."""
    sizes = [64, 64, 64, 64, 44] * 2
    ranks = sorted(json.loads((out / "summary.json").read_text())["ranks"], key=lambda r: r["rank"])
    assert ranks[0]["grad_sent_bytes"] is None  # the first rank has no one to send to
    for r in ranks[1:]:
        m = r["rank"] * per_rank
        delay = k - 1 - m
        expected = sum(sizes[: 10 - delay]) * INPUT_SAMPLE_BYTES[(k, m)]
        assert r["grad_sent_bytes"] == expected, (r["rank"], r["grad_sent_bytes"], expected)


def test_a_pipeline_resumes_a_one_process_checkpoint_with_batches_in_flight(tmp_path: Path) -> None:
    common = [*_common(2, "ddg"), "checkpoint.every_steps=3", "checkpoint.keep=100"]
    run_single(load_config(None, [*common, f"out_dir={tmp_path / 'single'}"]), console_summary=False)
    source = tmp_path / "single" / "checkpoints" / "0000000003"
    piped = run_torchrun(2, [*common, f"out_dir={tmp_path / 'pipe'}", f"resume={source}"])
    assert piped.returncode == 0, piped.stderr[-3000:]
    _assert_same(_shards(tmp_path / "single", 2), _shards(tmp_path / "pipe", 2))


def test_a_rank_waiting_for_a_gradient_names_the_hung_rank_within_the_timeout(tmp_path: Path) -> None:
    # rank 1 sleeps in its first step: rank 0 has sent batch 0 and waits for its gradient at step 1
    args = [*_common(2, "ddg"), f"out_dir={tmp_path / 'run'}", "debug.slow_module=1", "debug.slow_s=120"]
    t0 = time.monotonic()
    result = run_torchrun(2, [*args, "pipeline.timeout_s=5"], timeout=200)
    elapsed = time.monotonic() - t0
    assert result.returncode != 0
    # the hung rank is named, not the neighbour that waited for its gradient
    assert "error: rank 1 (module 1): stuck or dead: its neighbours waited 5 s for it" in result.stderr, (
        result.stderr[-2000:]
    )
    assert elapsed < 100, elapsed  # well before the hung rank would wake up


@contextlib.contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    """Forwards inside update copies of the BatchNorm running statistics, which are dropped
    (replicas r >= 1: replica 0's statistics are the ones every replica starts the next forward
    from). The originals are swapped back, not written: a graph that saved them stays valid."""
    originals = []
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None:
                originals.append((m, name, b))
                m._buffers[name] = b.clone()
    yield
    for m, name, b in originals:
        m._buffers[name] = b


def _mean_step(stage: Stage, params: list[nn.Parameter], per_replica: list[list[Tensor]]) -> None:
    """One update with the replicas' mean gradient: each divided by R, added in replica order."""
    replicas = len(per_replica)
    stage.optimizer.zero_grad(set_to_none=True)
    for p, *grads in zip(params, *per_replica, strict=True):
        total = grads[0] / replicas
        for g in grads[1:]:
            total = total + g / replicas
        p.grad = total
    stage.optimizer.step()
    stage.scheduler.step()


def _delayed_replicas_reference(
    overrides: list[str], replicas: int, regime: str
) -> tuple[dict, list[Stage], list, list]:
    """DDG or FR on K=2 modules with R data-parallel replicas, written out in one process.

    At step t, replica r of module 0 forwards shard r of batch t (DDG: through a copy of its
    weights, keeping the graph); replica r of module 1 computes the loss of that shard and its
    gradients; module 1 steps with the replicas' mean gradient. Module 0 then backpropagates batch
    t-1 (DDG: through its graphs; FR: through a replay of its forward with the current weights,
    BatchNorm statistics left as they were), each replica with the gradient its own replica of
    module 1 sent, and steps with their mean. BatchNorm running statistics follow replica 0.
    Returns the logged loss per (step, replica), the stages, and, per replica, the input of the
    batch still in flight on module 0 and the gradient module 1 sent for it.
    """
    cfg = load_config(None, overrides)
    torch.set_num_threads(1)
    ctx = build_context(cfg, torch.device("cpu"))
    first, last = ctx.build_stage(0), ctx.build_stage(1)
    shards = [Batches(ctx.data, cfg.data, cfg.seed, shard=(r, replicas)) for r in range(replicas)]
    names = [n for n, _ in first.body.named_parameters()]
    body_params = list(first.body.parameters())
    losses: dict[tuple[int, int], float] = {}
    in_flight: list = []  # module 0, batch t-1, per replica: (input, output with its graph, weights)
    sent: list[Tensor] = []  # module 1's ∂loss/∂input for batch t-1, per replica
    step = 0
    for epoch in range(cfg.train.epochs):
        streams = [shard.train_batches(epoch) for shard in shards]
        for _ in range(shards[0].steps_per_epoch):
            batch = [next(stream) for stream in streams]
            first.body.train()
            forwarded = []
            for r, (x, _) in enumerate(batch):
                weights = [p.detach().clone().requires_grad_() for p in body_params]
                with _buffers_kept(first.body) if r else contextlib.nullcontext():
                    if regime == "ddg":
                        out, _ = functional_call(
                            first.body, dict(zip(names, weights, strict=True)), (x,), {"kinetic_grad": False}
                        )
                    else:
                        with torch.no_grad():
                            out, _ = first.body(x, kinetic_grad=False)
                forwarded.append((x, out, weights))
            last.local_net.train()
            grads, now_sent = [], []
            for r, ((_, y), (_, out, _)) in enumerate(zip(batch, forwarded, strict=True)):
                inp = out.detach().requires_grad_()
                with _buffers_kept(last.local_net) if r else contextlib.nullcontext():
                    _, _, logits = last.local_net(inp, kinetic_grad=False)
                loss = F.cross_entropy(logits.float(), y)
                last.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grads.append([p.grad for p in last.parameters()])
                now_sent.append(inp.grad)
                n = len(y)
                losses[(step + 1, r)] = ((loss.detach() * n).double() / n).item()  # as logged
            _mean_step(last, last.parameters(), grads)
            if in_flight:
                grads = []
                for (x, out, weights), g in zip(in_flight, sent, strict=True):
                    if regime == "ddg":
                        out.backward(g)
                        grads.append([w.grad for w in weights])
                        continue
                    first.optimizer.zero_grad(set_to_none=True)
                    with _buffers_kept(first.body):
                        first.body(x, kinetic_grad=False)[0].backward(g)
                    grads.append([p.grad for p in body_params])
                _mean_step(first, body_params, grads)
            in_flight, sent = forwarded, now_sent
            step += 1
    return losses, [first, last], [x for x, _, _ in in_flight], sent


def _replica_losses(out: Path) -> dict[tuple[int, int], float]:
    return {
        (e["step"], e["replica"]): e["loss"]
        for e in read_metrics(out / "metrics.jsonl")
        if e["event"] == "train"
    }


def _assert_final_is_the_reference(out: Path, stages: list[Stage], inputs: list, sent: list) -> None:
    shards = _shards(out, 2)
    for stage, shard in zip(stages, shards, strict=True):
        for part, module in (("body", stage.body), ("head", stage.head)):
            for name, tensor in module.state_dict().items():  # weights and replica 0's statistics
                assert torch.equal(tensor, shard["stage"][part][name]), (stage.index, part, name)
    carry = shards[0]["carry"]  # module 0: replica 0's batch in flight, then replica 1's
    states = [carry, *carry["replica_states"]]
    assert [[p["step"] for p in s["pending"]] for s in states] == [[9], [9]]
    assert all(torch.equal(s["pending"][0]["x"], x) for s, x in zip(states, inputs, strict=True))
    assert all(torch.equal(s["grads"][0][1], g) for s, g in zip(states, sent, strict=True))


@pytest.mark.heavy(40)
@pytest.mark.parametrize("regime", ["ddg", "fr"])
def test_replicas_compute_the_data_parallel_reference_and_resume_it(tmp_path: Path, regime: str) -> None:
    # K=2 stages x R=2 replicas on 4 ranks; batches of 64 (shards of 32) and a last one of 44
    # (shards of 22). Replica r of module 1 sends its shard's gradient to replica r of module 0;
    # each module averages its replicas' gradients (divided by 2, summed: exact) before each step.
    common = [*_common(2, regime), "checkpoint.every_steps=3", "checkpoint.keep=100"]
    piped = run_torchrun(4, [*common, "pipeline.replicas=2", f"out_dir={tmp_path / 'pipe'}"])
    assert piped.returncode == 0, piped.stderr[-3000:]
    losses, stages, inputs, sent = _delayed_replicas_reference(common, 2, regime)
    assert len(losses) == 10 * 2 and _replica_losses(tmp_path / "pipe") == losses  # every step, both
    _assert_final_is_the_reference(tmp_path / "pipe", stages, inputs, sent)
    if regime == "fr":  # its checkpoints go through the same gather and load as DDG's, resumed below
        return
    # the step-3 checkpoint holds both replicas' batches in flight: a resumed run ends alike
    source = tmp_path / "pipe" / "checkpoints" / "0000000003"
    resumed = run_torchrun(
        4, [*common, "pipeline.replicas=2", f"out_dir={tmp_path / 'resumed'}", f"resume={source}"]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _replica_losses(tmp_path / "resumed") == {k: v for k, v in losses.items() if k[0] > 3}
    _assert_final_is_the_reference(tmp_path / "resumed", stages, inputs, sent)
    # another number of replicas would split those batches otherwise: one line, nothing written
    # (the same check in one process, which holds one replica, as in a torchrun without replicas)
    with pytest.raises(CheckpointError, match=r"resume with pipeline\.replicas=2"):
        run_single(load_config(None, [*common, f"out_dir={tmp_path / 'other'}", f"resume={source}"]))
    assert not (tmp_path / "other" / "metrics.jsonl").exists()
    assert not (tmp_path / "other" / "checkpoints").exists()


def test_sigterm_to_one_rank_checkpoints_the_batches_in_flight_and_resume_equals_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    from multiproc.test_layouts import _wait_for

    common = [*_common(2, "ddg"), "train.epochs=3", "checkpoint.every_epochs=0"]
    run_single(load_config(None, [*common, f"out_dir={tmp_path / 'single'}"]), console_summary=False)
    out = tmp_path / "pipe"
    slow = ["debug.slow_module=0", "debug.slow_s=0.2", "debug.trace=true"]
    proc = start_torchrun(2, [*common, f"out_dir={out}", *slow])
    _wait_for(out / "trace.rank1.jsonl", "TRAIN", 120)
    rank_process(psutil.Process(proc.pid), 1).send_signal(signal.SIGTERM)  # the last module's rank
    _, stderr = proc.communicate(timeout=120)
    assert "stopped: SIGTERM" in stderr, stderr[-3000:]
    folder = latest_complete(out)
    meta = json.loads((folder / "meta.json").read_text())
    assert not meta["progress"]["final"] and 0 < meta["progress"]["step"] < 15
    first = torch.load(folder / "module-0.pt", weights_only=True)["carry"]
    assert [p["step"] for p in first["pending"]] == [meta["progress"]["step"] - 1]  # one batch in flight
    done = run_torchrun(2, [*common, f"out_dir={out}", "resume=auto"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {folder}" in done.stdout
    _assert_same(_shards(tmp_path / "single", 2), _shards(out, 2))
