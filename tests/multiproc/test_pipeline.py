"""The pipeline across real torch.distributed ranks (torchrun, gloo, CPU)."""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import (
    TINY,
    rank_process,
    rank_processes,
    run_as_rank_0,
    run_torchrun,
    start_torchrun,
    train_here,
)

from trgl_pipe.config import load_config
from trgl_pipe.training.single import run_single
from trgl_pipe.watch.metrics import read_metrics

from .records import final_shards, step_losses

pytestmark = pytest.mark.multiproc


@pytest.mark.parametrize("k", [4])
def test_pipeline_computes_exactly_what_the_parallel_regime_computes(tmp_path: Path, k: int) -> None:
    # 300 images in batches of 64: the last batch of each epoch has 44; TRGL with adaptive λ on
    # every rank; per-step losses logged for every module. (Two ranks: the AugLocal, bf16-wire and
    # InfoPro pipelines compare every step with one process too.)
    common = [
        *TINY,
        f"model.num_modules={k}",
        "trgl.tau_schedule=adaptive",
        "trgl.lambda_init=20000",
        "trgl.s=2",
        "pipeline.buffer_size=2",
    ]
    train_here([*common, f"out_dir={tmp_path / 'single'}"])
    piped = run_torchrun(k, [*common, f"out_dir={tmp_path / 'pipe'}"])
    assert piped.returncode == 0, piped.stderr[-3000:]

    a, b = step_losses(tmp_path / "single"), step_losses(tmp_path / "pipe")
    assert len(a) == k * 10 and a == b  # every module, every step, bitwise
    for sa, sb in zip(final_shards(tmp_path / "single", k), final_shards(tmp_path / "pipe", k), strict=True):
        for part in ("body", "head"):
            for name, tensor in sa[part].items():
                assert torch.equal(tensor, sb[part][name]), (part, name)
        assert torch.equal(sa["objective"]["lam"], sb["objective"]["lam"])

    s1 = json.loads((tmp_path / "single" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    assert [m["test_accuracy"] for m in s1["modules"]] == [m["test_accuracy"] for m in s2["modules"]]
    assert [m["val_accuracy"] for m in s1["modules"]] == [m["val_accuracy"] for m in s2["modules"]]
    assert s2["world_size"] == k and s2["transport"] == "dist" and s2["data_backend"] == "gloo"
    assert [r["rank"] for r in s2["ranks"]] == list(range(k))
    for r in s2["ranks"]:
        for key in ("samples_per_s", "compute_s", "recv_wait_s", "send_wait_s", "peak_memory_bytes"):
            assert r[key] is not None and r[key] >= 0, key
        assert r["train_samples"] == 600
    # each rank's input buffer, observed as it takes a message (the first rank reads no link)
    assert s2["ranks"][0]["max_buffer_occupancy"] is None
    assert all(1 <= r["max_buffer_occupancy"] <= 2 == r["buffer_size"] for r in s2["ranks"][1:])
    assert not list((tmp_path / "pipe").glob("metrics.rank*.jsonl"))  # merged into metrics.jsonl
    # receive slots: 2 per link, each for 100 samples (evaluation batches are larger than the
    # training batches of 64), as trgl_pipe.plan and benchmarks/memory.py count them
    from trgl_pipe.config import load_config
    from trgl_pipe.context import build_context
    from trgl_pipe.runtime.layout import slot_samples

    ctx = build_context(load_config(None, common), torch.device("cpu"))
    x = torch.zeros(1, *ctx.input_shape)
    outputs = []
    for i in range(k - 1):
        x = ctx.build_stage(i).forward_frozen(x)
        outputs.append(x[0].numel())
    assert slot_samples(64, 100) == 100
    expected = [0] + [2 * 100 * n * 4 for n in outputs]
    assert [r["receive_slot_bytes"] for r in s2["ranks"]] == expected


@pytest.mark.parametrize("buffer_size", [1, 5])
def test_every_buffer_size_computes_the_same_and_closes_its_links(tmp_path: Path, buffer_size: int) -> None:
    # the receives a link still has posted after the STOP (buffer_size - 1 of them) are filled
    # by the sender's close: none with one slot, four with five; either way every rank ends
    common = [*TINY, "model.num_modules=3", "train.epochs=1", f"pipeline.buffer_size={buffer_size}"]
    train_here([*common, f"out_dir={tmp_path / 'single'}"])
    piped = run_torchrun(3, [*common, f"out_dir={tmp_path / 'pipe'}", "pipeline.timeout_s=20"], timeout=120)
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert step_losses(tmp_path / "single") == step_losses(tmp_path / "pipe")
    ranks = json.loads((tmp_path / "pipe" / "summary.json").read_text())["ranks"]
    assert all(1 <= r["max_buffer_occupancy"] <= buffer_size == r["buffer_size"] for r in ranks[1:])


def test_a_slow_consumer_holds_the_producer_to_the_buffer_size_and_its_send(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        *TINY,
        f"out_dir={out}",
        "model.num_modules=3",
        "pipeline.buffer_size=2",
        "debug.trace=true",
        "debug.slow_module=2",
        "debug.slow_s=0.05",
        "train.epochs=1",
        "train.eval_every_epochs=0",
    ]
    result = run_torchrun(3, args)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [
        json.loads(line) for r in range(3) for line in (out / f"trace.rank{r}.jsonl").read_text().splitlines()
    ]
    for sender in (0, 1):
        consumed = sorted(e["t"] for e in events if e["event"] == "consumed" and e["module"] == sender + 1)
        sent = sorted((e["index"], e["t"]) for e in events if e["event"] == "sent" and e["module"] == sender)
        assert len(sent) == len(consumed) > 5
        ahead = [i + 1 - sum(1 for c in consumed if c < t) for i, t in sent]
        # buffer_size messages in the receiver's slots, plus the one being sent (no credits: the
        # sender waits for its previous message to land before it sends the next)
        assert max(ahead) <= 3, f"rank {sender} ran {max(ahead)} messages ahead"
        if sender == 1:
            assert max(ahead) == 3, "the slow rank never filled its buffer: the test proves nothing"


def test_a_rank_that_raises_ends_the_job_naming_it(tmp_path: Path) -> None:
    args = [
        *TINY,
        f"out_dir={tmp_path / 'run'}",
        "model.num_modules=3",
        "debug.raise_at_step=3",
        "debug.raise_on_module=1",
        "pipeline.timeout_s=20",
    ]
    t0 = time.monotonic()
    result = run_torchrun(3, args, timeout=200)
    elapsed = time.monotonic() - t0
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    cause = "rank 1 (module 1) failed: InjectedFault: debug.raise_at_step=3 reached in module 1"
    # said once, by the failing rank with its module: its neighbours stop silently (they learn the
    # cause and its exit code from the store instead of reporting "lost rank 1")
    assert errors == [f"error: {cause}"], result.stderr[-3000:]
    assert "lost rank" not in result.stderr
    assert elapsed < 20 + 60  # the timeout, plus start-up of three processes on two cores
    assert not (tmp_path / "run" / "summary.json").exists()


def test_sigkill_of_one_rank_stops_every_rank(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        *TINY,
        f"out_dir={out}",
        "model.num_modules=3",
        "train.epochs=50",
        "data.train_size=1000",
        "pipeline.timeout_s=20",
        "debug.trace=true",
    ]
    proc = start_torchrun(3, args)
    launcher = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    trace = out / "trace.rank2.jsonl"
    while time.monotonic() < deadline and not (trace.exists() and trace.stat().st_size > 0):
        time.sleep(0.2)
    victim = rank_process(launcher, 2)
    assert victim is not None
    workers = [p for ps in rank_processes(launcher).values() for p in ps]
    t0 = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert elapsed < 20 + 15, elapsed
    assert "exitcode  : -9" in stderr and "rank      : 2" in stderr
    time.sleep(0.5)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_world_size_must_match_the_number_of_modules(tmp_path: Path) -> None:
    result = run_torchrun(2, [*TINY, f"out_dir={tmp_path / 'run'}", "model.num_modules=3"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: torchrun started 2 ranks but model.num_modules=3 with pipeline.modules_per_rank=1 and "
        "pipeline.replicas=1 needs (K/M)×R = (3/1)×1 = 3 ranks; start torchrun --nproc_per_node=3 ..., "
        "or set pipeline.modules_per_rank=3 pipeline.replicas=2, or set model.num_modules=2"
    ]


def test_sequential_cannot_run_across_ranks(tmp_path: Path) -> None:
    result = run_as_rank_0(2, [*TINY, f"out_dir={tmp_path / 'run'}", "train.regime=sequential"])
    assert result.returncode == 2
    assert "error: train.regime=sequential cannot run across ranks" in result.stderr
    assert not (tmp_path / "run").exists()


def _wait_for_checkpoint(out: Path, at_least: int, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    root = out / "checkpoints"
    while time.monotonic() < deadline:
        if root.is_dir() and any(
            int(p.name) >= at_least and (p / "meta.json").is_file() for p in root.iterdir()
        ):
            return
        time.sleep(0.1)
    raise AssertionError(f"no complete checkpoint at or after step {at_least} in {deadline_s} s")


@pytest.mark.heavy(45)
@pytest.mark.parametrize("restart", ["relaunch", "max-restarts"])
def test_a_killed_pipeline_resumes_and_ends_like_an_uninterrupted_run(tmp_path: Path, restart: str) -> None:
    common = [*TINY, "model.num_modules=3", "train.epochs=4", "checkpoint.every_steps=2", "checkpoint.keep=3"]
    # the uninterrupted reference in this process (what the pipeline equals, as test_layouts shows)
    run_single(load_config(None, [*common, f"out_dir={tmp_path / 'reference'}"]), console_summary=False)
    out = tmp_path / "pipe"
    args = [
        *common,
        f"out_dir={out}",
        "resume=auto",
        "debug.slow_module=0",
        "debug.slow_s=0.25",
        "pipeline.timeout_s=20",
    ]
    proc = start_torchrun(3, args, *(["--max-restarts=1"] if restart == "max-restarts" else []))
    _wait_for_checkpoint(out, at_least=6, deadline_s=150)
    victim = rank_process(psutil.Process(proc.pid), 1)
    assert victim is not None
    victim.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=200)
    if restart == "relaunch":
        assert proc.returncode != 0
        again = run_torchrun(3, args, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resumed from" in again.stdout
    else:
        assert proc.returncode == 0, stderr[-3000:]
    for sa, sb in zip(final_shards(tmp_path / "reference", 3), final_shards(out, 3), strict=True):
        for part in ("body", "head"):
            for name, tensor in sa[part].items():
                assert torch.equal(tensor, sb[part][name]), (part, name)
    s1 = json.loads((tmp_path / "reference" / "summary.json").read_text())
    s2 = json.loads((out / "summary.json").read_text())
    assert [m["test_accuracy"] for m in s1["modules"]] == [m["test_accuracy"] for m in s2["modules"]]


def test_sigterm_stops_the_pipeline_with_a_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        *TINY,
        f"out_dir={out}",
        "model.num_modules=3",
        "train.epochs=20",
        "checkpoint.every_epochs=0",
        "debug.slow_module=0",
        "debug.slow_s=0.1",
    ]
    proc = start_torchrun(3, args)
    metrics = out / "metrics.rank2.jsonl"
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and not (metrics.exists() and '"train"' in metrics.read_text()):
        time.sleep(0.1)
    rank_process(psutil.Process(proc.pid), 2).send_signal(
        signal.SIGTERM
    )  # to the last rank only: it tells rank 0 through the store
    _, stderr = proc.communicate(timeout=120)
    assert "stopped: SIGTERM" in stderr
    folder = sorted(p for p in (out / "checkpoints").iterdir() if (p / "meta.json").is_file())[-1]
    meta = json.loads((folder / "meta.json").read_text())
    assert not meta["progress"]["final"] and meta["progress"]["step"] > 0
    assert not (out / "summary.json").exists()


def test_a_hung_rank_is_named_by_its_neighbours_within_the_timeout(tmp_path: Path) -> None:
    args = [
        *TINY,
        f"out_dir={tmp_path / 'run'}",
        "model.num_modules=3",
        "debug.slow_module=1",
        "debug.slow_s=120",
        "pipeline.timeout_s=5",
    ]
    t0 = time.monotonic()
    result = run_torchrun(3, args, timeout=200)
    elapsed = time.monotonic() - t0
    assert result.returncode != 0
    assert "waited 5 s for" in result.stderr and "rank 1" in result.stderr
    # the rank that stopped is named, not the neighbour that noticed; said once
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: rank 1 (module 1): stuck or dead: its neighbours waited 5 s for it "
        "(pipeline.timeout_s sets this limit)"
    ], result.stderr[-3000:]
    # well before the hung rank would wake up (120 s into its first step): the neighbours that
    # recorded it stop it themselves. The bound leaves room for the start of three ranks, which
    # took up to 30 s on a loaded 2-core machine (a CI run there once took 37 s in all)
    assert elapsed < 90, elapsed


def test_a_bad_shard_on_a_later_rank_is_named_by_that_rank(tmp_path: Path) -> None:
    # rank 2 (module 2) finds its shard corrupt on resume: it says so with its rank and module,
    # and the other ranks stop with its exit code instead of reporting "lost rank 2"
    out = tmp_path / "run"
    common = [*TINY, f"out_dir={out}", "model.num_modules=3", "train.epochs=1"]
    run_single(load_config(None, common), console_summary=False)  # its shards, written in this process
    folder = sorted(p for p in (out / "checkpoints").iterdir() if (p / "meta.json").is_file())[-1]
    (folder / "module-2.pt").write_bytes(b"not a checkpoint")
    result = run_torchrun(3, [*common, "resume=auto", "train.epochs=2"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: rank 2 (module 2): checkpoint shard {folder / 'module-2.pt'} is corrupt (UnpicklingError); "
        "resume from an earlier checkpoint"
    ]
    assert "lost rank" not in result.stderr
    assert "exitcode  : 2" in result.stderr  # as the same error in one process


def test_a_rank_that_does_not_see_rank_0s_out_dir_is_named_before_anything_is_written(tmp_path: Path) -> None:
    # on two nodes without a shared file system, rank 1 would look at a folder of its own: it
    # reads rank 0's lock token back (here hidden from it, as another node's disk would)
    out = tmp_path / "run"
    result = run_torchrun(2, [*TINY, f"out_dir={out}", "debug.hide_out_dir_from_rank=1"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = (
        f"out_dir={out} is not the folder rank 0 holds, as rank 1 on {socket.gethostname()} sees it: "
        "ranks on several nodes need one shared out_dir"
    )
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]  # after the reporting rank
    assert "exitcode  : 2" in result.stderr
    assert not out.exists()  # rank 0 created it, locked it and removed it again: nothing written


def test_sigterm_during_an_evaluation_stops_without_waiting_for_all_of_it(tmp_path: Path) -> None:
    # 40 evaluation batches at 0.25 s each in module 1: 10 s of evaluation; SIGTERM comes during it
    out = tmp_path / "run"
    args = [
        *TINY,
        f"out_dir={out}",
        "model.num_modules=3",
        "train.epochs=2",
        "data.eval_batch_size=10",
        "data.test_size=300",
        "debug.slow_module=1",
        "debug.slow_eval_s=0.25",
        "debug.trace=true",
    ]
    proc = start_torchrun(3, args)
    trace = out / "trace.rank1.jsonl"
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and not (trace.exists() and '"EVAL"' in trace.read_text()):
        time.sleep(0.05)
    t0 = time.monotonic()
    rank_process(psutil.Process(proc.pid), 0).send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert time.monotonic() - t0 < 8, "the stop waited for the whole evaluation"
    assert "stopped: SIGTERM" in stderr
    for rank in range(3):  # every rank took the stop from the stream: all exit 143 together
        events = read_metrics(out / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl"))
        assert any(e["event"] == "preempted" for e in events), rank
    assert stderr.count("exitcode  : 143") >= 1 and "exitcode  : 0" not in stderr
    folder = sorted(p for p in (out / "checkpoints").iterdir() if (p / "meta.json").is_file())[-1]
    progress = json.loads((folder / "meta.json").read_text())["progress"]
    assert (progress["epoch"], progress["batch"], progress["step"]) == (0, 5, 5)  # after epoch 0's batches
