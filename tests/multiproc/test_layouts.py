"""Pipeline layouts across real ranks (torchrun, gloo, CPU): several modules per rank, replicas."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import (
    ROOT,
    TINY,
    rank_process,
    rank_processes,
    run_as_rank_0,
    run_torchrun,
    start_torchrun,
    train_here,
)

from trgl_pipe.config import load_config
from trgl_pipe.context import build_context
from trgl_pipe.data import Batches
from trgl_pipe.runtime.schedule import eval_due, total_steps
from trgl_pipe.training.single import run_single
from trgl_pipe.watch.metrics import read_metrics

sys.path.insert(0, str(ROOT / "benchmarks"))
import emulated_nodes

from .data_parallel import as_logged, averaged_step, forward_shards
from .records import final_shards, step_losses

pytestmark = pytest.mark.multiproc


def _assert_same_parameters(a: list[dict], b: list[dict]) -> None:
    for sa, sb in zip(a, b, strict=True):
        for part in ("body", "head"):
            for name, tensor in sa[part].items():
                assert torch.equal(tensor, sb[part][name]), (part, name)
        assert torch.equal(sa["objective"]["lam"], sb["objective"]["lam"])


# (K=8 on 4 ranks ran here too; it checked nothing K=4 on 2 ranks does not, at twice the CI time)
@pytest.mark.parametrize(("k", "per_rank", "depth"), [(4, 2, 14)])
def test_several_modules_per_rank_compute_exactly_what_one_process_computes(
    tmp_path: Path, k: int, per_rank: int, depth: int
) -> None:
    common = [
        *TINY,
        f"model.depth={depth}",
        f"model.num_modules={k}",
        "trgl.tau_schedule=adaptive",
        "trgl.lambda_init=20000",
        "trgl.s=2",
    ]
    train_here([*common, f"out_dir={tmp_path / 'single'}"])
    ranks = k // per_rank
    piped = run_torchrun(
        ranks, [*common, f"pipeline.modules_per_rank={per_rank}", f"out_dir={tmp_path / 'pipe'}"]
    )
    assert piped.returncode == 0, piped.stderr[-3000:]
    a, b = step_losses(tmp_path / "single", by_replica=True), step_losses(tmp_path / "pipe", by_replica=True)
    assert len(a) == k * 10 and a == b  # every module, every step, bitwise
    _assert_same_parameters(final_shards(tmp_path / "single", k), final_shards(tmp_path / "pipe", k))
    summary = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    assert summary["world_size"] == ranks and summary["layout"]["modules_per_rank"] == per_rank
    assert [r["modules"] for r in summary["ranks"]] == [
        list(range(s * per_rank, (s + 1) * per_rank)) for s in range(ranks)
    ]


def _data_parallel_reference(overrides: list[str], replicas: int) -> tuple[dict, list[dict], list[float]]:
    """The computation of a K-module pipeline with ``replicas`` replicas per stage, in one process.

    Each batch is split into shards; module k computes the gradient of each shard separately
    (each shard normalised with its own BatchNorm statistics), the gradients are averaged as DDP
    does (each scaled by 1/R, then summed), and one optimizer step follows. BatchNorm running
    statistics follow replica 0 (DDP copies them to the others before each forward). The
    adaptive λ is updated from the replicas' mean CE. Evaluation: each replica's shard through
    replica 0's weights, counts summed.
    Returns per-step (loss, CE, kinetic) per (module, step, replica), the final states and the
    final validation accuracies.
    """
    cfg = load_config(None, overrides)
    torch.set_num_threads(1)
    ctx = build_context(cfg, torch.device("cpu"))
    stages = [ctx.build_stage(i) for i in range(ctx.num_modules)]
    shards = [Batches(ctx.data, cfg.data, cfg.seed, shard=(r, replicas)) for r in range(replicas)]
    spe = shards[0].steps_per_epoch
    limit = total_steps(cfg, spe)
    losses: dict = {}
    accuracies: list[float] = []
    for epoch in range(cfg.train.epochs):
        streams = [s.train_batches(epoch) for s in shards]
        for _ in range(min(spe, limit)):
            xs = [next(stream) for stream in streams]  # (x_r, y_r) per replica
            for stage in stages:
                net = stage.local_net
                net.train()

                def forward(shard, net=net, stage=stage):
                    x, y = shard
                    out, kinetic, logits = net(x, kinetic_grad=stage.objective.enabled)
                    return out, kinetic, logits, F.cross_entropy(logits.float(), y)

                outputs = forward_shards(net, xs, forward)
                # λ: once per step, from the mean CE of the replicas (LocalObjective's order)
                objective = stage.objective
                objective.num_steps += 1
                if (
                    objective.adaptive
                    and objective.num_steps > 1
                    and (objective.num_steps - 1) % objective.s == 0
                ):
                    ces = [o[3].detach().float() for o in outputs]
                    total = ces[0].clone()
                    for c in ces[1:]:
                        total = total + c
                    objective.lam.add_(total / replicas, alpha=objective.h)
                grads = []
                params = stage.parameters()
                for r, (_, kinetic, _, ce) in enumerate(outputs):
                    if objective.adaptive:
                        loss = ce + kinetic * objective.lam.reciprocal()
                    else:
                        loss = ce + kinetic * (0.5 / objective.tau)
                    losses[(stage.index, stage.num_steps + 1, r)] = as_logged(
                        (loss, ce, kinetic), len(xs[r][1])
                    )
                    grads.append(torch.autograd.grad(loss, params))
                averaged_step(stage, grads)
                xs = [(o[0].detach(), y) for o, (_, y) in zip(outputs, xs, strict=True)]
        if eval_due(cfg, epoch, cfg.train.epochs - 1):
            correct = [0] * len(stages)
            count = 0
            for shard in shards:
                for x, y in shard.eval_batches("val"):
                    count += len(y)
                    with torch.no_grad():
                        for i, stage in enumerate(stages):
                            stage.local_net.eval()
                            x, _, logits = stage.local_net(x, kinetic_grad=False, per_block=True)
                            correct[i] += int((logits.argmax(1) == y).sum())
            accuracies = [c / count for c in correct]
    states = [
        {"body": s.body.state_dict(), "head": s.head.state_dict(), "objective": {"lam": s.objective.lam}}
        for s in stages
    ]
    return losses, states, accuracies


def test_replicas_on_two_emulated_nodes_compute_the_data_parallel_reference(tmp_path: Path) -> None:
    # K=2 stages x R=2 replicas on 4 ranks; 300 images in batches of 64 (a last batch of 44, so
    # shards of 32 and 22), adaptive λ. Gloo sums the two scaled gradients in a fixed order and
    # 1/2 is exact, so the pipeline can match the reference bit for bit.
    common = [
        *TINY,
        "model.num_modules=2",
        "trgl.tau_schedule=adaptive",
        "trgl.lambda_init=20000",
        "trgl.s=2",
    ]
    # as two emulated nodes where the machine allows it (a stage's replicas on one node, the
    # stages on two), else as one torchrun
    _two_nodes_or_one([*common, "pipeline.replicas=2", f"out_dir={tmp_path / 'pipe'}"])
    losses, states, accuracies = _data_parallel_reference([*common, f"out_dir={tmp_path / 'ref'}"], 2)
    got = step_losses(tmp_path / "pipe", by_replica=True)
    assert len(got) == len(losses) == 2 * 10 * 2
    assert got == losses
    _assert_same_parameters(states, final_shards(tmp_path / "pipe", 2))
    summary = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    assert [m["val_accuracy"] for m in summary["modules"]] == accuracies
    assert [m["history"][-1]["val_accuracy"] for m in summary["modules"]] == accuracies
    evals = [e for e in read_metrics(tmp_path / "pipe" / "metrics.jsonl") if e["event"] == "eval"]
    assert {e["count"] for e in evals if e["split"] == "val"} == {100}  # counts over both replicas
    assert [s["replicas"] for s in summary["stages"]] == [2, 2]
    assert [s["train_samples"] for s in summary["stages"]] == [600, 600]
    assert [(r["stage"], r["replica"]) for r in summary["ranks"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def _two_nodes_or_one(args: list[str]) -> None:
    """Run the 4-rank job ``args`` as the README's two-node launch (c10d rendezvous, one torchrun
    agent per node, 2 ranks each), each agent in a network namespace of its own, so every byte
    between the nodes crosses the veth link (benchmarks/emulated_nodes.py); where the machine
    cannot make namespaces (no root or no ip), as one torchrun of 4 ranks. The out_dir is one
    folder both see."""
    if emulated_nodes.why_not() is not None:
        piped = run_torchrun(4, args)
        assert piped.returncode == 0, piped.stderr[-3000:]
        return
    with emulated_nodes.two_nodes() as nodes:
        launches = emulated_nodes.torchrun_on_nodes(nodes, 2, ["-m", "trgl_pipe.run", *args])
        ended = emulated_nodes.run_agents(launches, ROOT, timeout=300)
    assert [code for code, _ in ended] == [0, 0], [err[-2000:] for _, err in ended]


def _wait_for(path: Path, text: str, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{text} never appeared in {path}")


def test_sigkill_of_a_replica_ends_the_whole_job(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        *TINY,
        f"out_dir={out}",
        "model.num_modules=2",
        "pipeline.replicas=2",
        "train.epochs=50",
        "data.train_size=1000",
        "pipeline.timeout_s=20",
        "debug.trace=true",
    ]
    proc = start_torchrun(4, args)
    _wait_for(out / "trace.rank3.jsonl", "TRAIN", 120)
    launcher = psutil.Process(proc.pid)
    workers = [p for ps in rank_processes(launcher).values() for p in ps]
    victim = rank_process(launcher, 1)  # stage 0, replica 1
    t0 = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 20 + 10
    assert "exitcode  : -9" in stderr and "rank      : 1" in stderr
    time.sleep(0.5)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_sigterm_checkpoints_and_the_run_resumes_with_another_number_of_replicas(tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = [*TINY, f"out_dir={out}", "model.num_modules=2", "train.epochs=3", "checkpoint.every_epochs=0"]
    proc = start_torchrun(
        4, [*common, "pipeline.replicas=2", "debug.slow_module=0", "debug.slow_s=0.2", "debug.trace=true"]
    )
    _wait_for(out / "trace.rank3.jsonl", "TRAIN", 120)
    rank_process(psutil.Process(proc.pid), 3).send_signal(signal.SIGTERM)  # the last stage, replica 1
    _, stderr = proc.communicate(timeout=120)
    assert "stopped: SIGTERM" in stderr
    for rank in range(4):  # every rank learned the stop from the stream: all agree
        events = read_metrics(out / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl"))
        assert any(e["event"] == "preempted" for e in events), rank
    folders = sorted(p for p in (out / "checkpoints").iterdir() if (p / "meta.json").is_file())
    meta = json.loads((folders[-1] / "meta.json").read_text())
    assert meta["layout"]["replicas"] == 2 and not meta["progress"]["final"]
    done = run_torchrun(2, [*common, "resume=auto"])  # one replica per stage now
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {folders[-1]}" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [m["num_steps"] for m in summary["modules"]] == [15, 15]  # 3 epochs of 5 steps in all
    assert summary["layout"]["replicas"] == 1


def test_a_layout_that_does_not_fit_the_ranks_is_one_line(tmp_path: Path) -> None:
    result = run_as_rank_0(
        3, [*TINY, f"out_dir={tmp_path / 'run'}", "model.num_modules=4", "pipeline.replicas=2"]
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: torchrun started 3 ranks but model.num_modules=4 with pipeline.modules_per_rank=1 and "
        "pipeline.replicas=2 needs (K/M)×R = (4/1)×2 = 8 ranks; start torchrun --nproc_per_node=8 ..., "
        "or set pipeline.modules_per_rank=4 pipeline.replicas=3"
    ]


def test_sync_batchnorm_on_cpu_ranks_is_one_line(tmp_path: Path) -> None:
    args = [
        *TINY,
        f"out_dir={tmp_path / 'run'}",
        "model.num_modules=2",
        "pipeline.replicas=2",
        "pipeline.sync_batchnorm=true",
    ]
    result = run_as_rank_0(4, args)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pipeline.sync_batchnorm=true needs GPUs" in errors[0]
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_resumes_with_another_number_of_modules_per_rank(tmp_path: Path) -> None:
    # Shards are per module: a K=4 run checkpointed with its four modules in one process continues
    # with two per rank (2 ranks), and ends exactly where the uninterrupted run ends. (Shards that
    # ranks of one module each wrote are resumed by test_pipeline.py's killed-pipeline test.)
    common = [*TINY, "model.num_modules=4", "train.epochs=2"]
    reference = tmp_path / "reference"
    run_single(load_config(None, [*common, f"out_dir={reference}"]), console_summary=False)
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    # continue from the epoch-0 checkpoint (step 5) with two modules per rank; the run reaches the
    # final checkpoint's counter again, which is replaced only once its successor is complete
    epoch_end = out / "checkpoints" / "0000000005"
    assert (epoch_end / "meta.json").is_file()
    second = run_torchrun(
        2, [*common, f"out_dir={out}", f"resume={epoch_end}", "pipeline.modules_per_rank=2"]
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {epoch_end}" in second.stdout
    _assert_same_parameters(final_shards(reference, 4), final_shards(out, 4))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["0000000005", "0000000010"]
