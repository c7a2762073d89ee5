"""A user's network and data on the torchrun pipeline: bitwise the single-process parallel run,
the Python API under torchrun, and ranks that build different networks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import ROOT, run_torchrun, torchrun_cmd, train_here

from trgl_pipe.watch.metrics import read_metrics

from .data_parallel import as_logged, averaged_step, forward_shards
from .records import final_shards, step_losses

pytestmark = pytest.mark.multiproc

USER = [
    "data.name=tests.user_pkg.data:arrays",
    "data.val_size=60",
    "data.batch_size=32",
    "data.eval_batch_size=50",
    "model.arch=tests.user_pkg.nets:resnet",
    "model.arch_kwargs={depth: 14, width: 4}",
    "model.num_modules=4",
    "train.epochs=2",
    "train.num_threads=1",
    "optim.lr=0.05",
    "trgl.tau=1000",
    "log.live=off",
    "log.every_steps=1",
]


def test_a_user_network_and_objective_on_four_ranks_compute_what_one_process_computes(tmp_path: Path) -> None:
    # 180 training images in batches of 32: a last partial batch of 20; the Residual ResNet-14
    # (6 blocks), the arrays dataset and the Distill objective (a network, kwargs and state of
    # its own) all come from tests/user_pkg
    user = [*USER, "objective.name=tests.user_pkg.objectives:Distill", "objective.kwargs={weight: 0.5}"]
    train_here([*user, f"out_dir={tmp_path / 'single'}"])
    piped = run_torchrun(4, [*user, f"out_dir={tmp_path / 'pipe'}"])
    assert piped.returncode == 0, piped.stderr[-3000:]
    a, b = step_losses(tmp_path / "single"), step_losses(tmp_path / "pipe")
    assert len(a) == 4 * 12 and a == b  # every module, every step, bitwise
    assert all(kinetic > 0 for _, _, kinetic in a.values())
    for sa, sb in zip(final_shards(tmp_path / "single", 4), final_shards(tmp_path / "pipe", 4), strict=True):
        for part in ("body", "head", "aux"):
            for name, tensor in sa[part].items():
                assert torch.equal(tensor, sb[part][name]), (part, name)
        assert torch.equal(sa["objective"]["centres"], sb["objective"]["centres"])
        assert sa["objective"]["steps"] == sb["objective"]["steps"] == 12
    s1 = json.loads((tmp_path / "single" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    assert [m["test_accuracy"] for m in s1["modules"]] == [m["test_accuracy"] for m in s2["modules"]]
    assert s2["world_size"] == 4 and s2["transport"] == "dist"
    assert [m["method"] for m in s2["modules"]] == ["distill(weight=0.5)"] * 4


SCRIPT = """
import json, sys
import trgl_pipe
from tests.user_pkg.data import datasets
from tests.user_pkg.nets import vit

config = {"data": {"val_size": 60, "batch_size": 32}, "train": {"epochs": 1, "num_threads": 1}}
summary = trgl_pipe.train(
    config, model=vit, data=datasets, out_dir=sys.argv[1], log={"live": "off"},
    **{"model.num_modules": 2, "model.arch_kwargs": {"depth": 2}},
)
# one write per line: both ranks print to torchrun's stdout at once (print's pieces interleaved)
line = json.dumps({"world_size": summary["world_size"], "modules": len(summary["modules"])})
sys.stdout.write(f"SUMMARY {line}\\n")
sys.stdout.flush()
"""


def _torchrun_script(script: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = torchrun_cmd(nproc, list(args), target=(str(script),))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_train_runs_a_user_dataset_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "my_script.py"
    script.write_text(SCRIPT)
    result = _torchrun_script(script, 2, str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    # both ranks return the summary (they share out_dir here)
    lines = [line for line in result.stdout.splitlines() if line.startswith("SUMMARY")]
    assert lines == ['SUMMARY {"world_size": 2, "modules": 2}'] * 2, result.stdout[-2000:]
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: tests.user_pkg.data:datasets" in saved and "arch: tests.user_pkg.nets:vit" in saved


def test_ranks_that_build_different_networks_stop_with_one_line(tmp_path: Path) -> None:
    result = run_torchrun(
        2,
        [
            *USER,
            "model.arch=tests.user_pkg.nets:rank_dependent",
            "model.arch_kwargs={}",
            "model.num_modules=2",
            f"out_dir={tmp_path / 'run'}",
            "pipeline.timeout_s=20",
        ],
    )
    assert result.returncode != 0  # torchrun's own code; the ranks exit with 2 (bad input)
    assert "exitcode  : 2" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank 1 built another network than rank 0" in errors[0], result.stderr[-3000:]


def _user_data_parallel_reference(overrides: list[str], replicas: int) -> tuple[dict, list[dict]]:
    """A K-module pipeline with ``replicas`` replicas per stage and a user's objective, in one
    process: each shard's forward in turn (replica 0's BatchNorm statistics survive, as DDP
    broadcasts them), then each replica's loss in its own thread, whose ``objective.average`` is
    an all-reduce over the threads (sum, then / R, as the pipeline's), then the gradients
    averaged as DDP averages them and one optimizer step. Returns per-step (loss, CE, kinetic) per
    (module, step, replica) and the final states with the objective's."""
    import copy
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch.nn.functional as F

    from trgl_pipe.config import load_config
    from trgl_pipe.context import build_context
    from trgl_pipe.data import Batches
    from trgl_pipe.objectives import LocalInputs
    from trgl_pipe.runtime.schedule import total_steps

    cfg = load_config(None, overrides)
    torch.set_num_threads(1)
    ctx = build_context(cfg, torch.device("cpu"))
    stages = [ctx.build_stage(i) for i in range(ctx.num_modules)]
    objectives = [[s.objective] + [copy.deepcopy(s.objective) for _ in range(replicas - 1)] for s in stages]
    barrier = threading.Barrier(replicas)
    slots: list = [None] * replicas

    def all_reduce_average(r: int):
        def average(t: torch.Tensor) -> torch.Tensor:
            slots[r] = t.detach().clone()
            barrier.wait()
            total = slots[0].clone()
            for other in slots[1:]:
                total = total + other
            barrier.wait()  # every thread has read the slots before the next call fills them
            return total / replicas

        return average

    for per_stage in objectives:
        for r, objective in enumerate(per_stage):
            objective.average = all_reduce_average(r)
    shards = [Batches(ctx.data, cfg.data, cfg.seed, shard=(r, replicas)) for r in range(replicas)]
    steps = min(shards[0].steps_per_epoch, total_steps(cfg, shards[0].steps_per_epoch))
    losses: dict = {}
    for epoch in range(cfg.train.epochs):
        streams = [s.train_batches(epoch) for s in shards]
        for _ in range(steps):
            xs = [next(stream) for stream in streams]
            for stage, per_replica in zip(stages, objectives, strict=True):
                net = stage.local_net
                net.train()

                def forward(shard, net=net):
                    x, y = shard
                    out, kinetic, logits, extras = net(x, kinetic_grad=False, extras=True)
                    return LocalInputs(
                        x, out, kinetic, logits, F.cross_entropy(logits.float(), y), y, None, extras
                    )

                forwards = forward_shards(net, xs, forward)
                with ThreadPoolExecutor(replicas) as pool:  # the replicas' losses at once: they all-reduce
                    results = list(pool.map(lambda o, i: o.loss(i), per_replica, forwards))
                params = stage.parameters()
                grads = []
                for r, inputs in enumerate(forwards):
                    logged = as_logged((results[r], inputs.ce, inputs.kinetic), len(inputs.y))
                    losses[(stage.index, stage.num_steps + 1, r)] = logged
                    grads.append(torch.autograd.grad(results[r], params))
                averaged_step(stage, grads)
                xs = [(inputs.out.detach(), inputs.y) for inputs in forwards]
    for per_replica in objectives:  # what must stay equal stayed equal
        assert all(torch.equal(o.centres, per_replica[0].centres) for o in per_replica)
    states = [
        {
            "body": s.body.state_dict(),
            "head": s.head.state_dict(),
            "aux": s.aux.state_dict(),
            "objective": s.objective.state_dict(),
        }
        for s in stages
    ]
    return losses, states


def test_a_user_objective_with_two_replicas_computes_the_data_parallel_reference(tmp_path: Path) -> None:
    # K=2 stages x R=2 replicas on 4 ranks; 180 images in batches of 32 (a last batch of 20:
    # shards of 16 and 10); Distill's class centres move with the whole batch's projections,
    # which its averaging hook (self.average, an all-reduce over the replicas) gives each replica
    user = [
        *[o for o in USER if not o.startswith("model.num_modules")],
        "model.num_modules=2",
        "objective.name=tests.user_pkg.objectives:Distill",
        "objective.kwargs={weight: 0.5}",
        "train.epochs=1",
    ]
    piped = run_torchrun(4, [*user, "pipeline.replicas=2", f"out_dir={tmp_path / 'pipe'}"])
    assert piped.returncode == 0, piped.stderr[-3000:]
    losses, states = _user_data_parallel_reference([*user, f"out_dir={tmp_path / 'ref'}"], 2)
    got = {
        (e["module"], e["step"], e.get("replica", 0)): (e["loss"], e["ce"], e["kinetic"])
        for e in read_metrics(tmp_path / "pipe" / "metrics.jsonl")
        if e["event"] == "train"
    }
    assert len(got) == len(losses) == 2 * 6 * 2 and got == losses  # bitwise, every replica
    for sa, sb in zip(states, final_shards(tmp_path / "pipe", 2), strict=True):
        for part in ("body", "head", "aux"):
            for name, tensor in sa[part].items():
                assert torch.equal(tensor, sb[part][name]), (part, name)
        assert torch.equal(sa["objective"]["centres"], sb["objective"]["centres"])
        assert sa["objective"]["steps"] == sb["objective"]["steps"] == 6
