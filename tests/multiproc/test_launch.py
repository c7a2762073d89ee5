"""Failures under torchrun through launch/torchrun.sh's launcher: one line, the cause last, its exit code."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, TINY, torchrun_cmd

from trgl_pipe.config import load_config
from trgl_pipe.folder.run_folder import claim

pytestmark = pytest.mark.multiproc


def _launch_cmd(nproc: int, args: list[str]) -> list[str]:
    return torchrun_cmd(nproc, args, launcher="trgl_pipe.launch")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _launch(nproc: int, args: list[str], timeout: float = 200) -> subprocess.CompletedProcess:
    return subprocess.run(
        _launch_cmd(nproc, args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env()
    )


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _start_training(nproc: int, args: list[str], metrics: Path) -> tuple[subprocess.Popen, psutil.Process]:
    """The launcher on ``nproc`` ranks, once ``metrics`` shows a training step; and rank 1's process."""
    proc = subprocess.Popen(
        _launch_cmd(nproc, args),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and not (metrics.exists() and '"train"' in metrics.read_text()):
        time.sleep(0.1)
    victim = next(
        c
        for c in psutil.Process(proc.pid).children(recursive=True)
        if c.environ().get("RANK") == "1" and "trgl_pipe.run" in " ".join(c.cmdline())
    )
    return proc, victim


def test_a_failing_rank_is_said_once_last_with_exit_status_1(tmp_path: Path) -> None:
    args = [*TINY, f"out_dir={tmp_path / 'run'}", "debug.raise_at_step=2", "debug.raise_on_module=1"]
    result = _launch(2, args)
    cause = "error: rank 1 (module 1) failed: InjectedFault: debug.raise_at_step=2 reached in module 1"
    assert result.returncode == 1, result.stderr[-3000:]
    assert _errors(result.stderr) == [cause], result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == cause
    assert "Traceback" not in result.stderr


def test_a_stopped_rank_is_named_as_stuck_within_the_timeout(tmp_path: Path) -> None:
    # SIGSTOP: the rank neither answers nor handles torchrun's SIGTERM. Its neighbours record it as
    # stuck after pipeline.timeout_s and SIGKILL it (torchrun would wait 30 s, then SIGKILL it and
    # report that kill as the cause); the launcher reports their line, exit 1
    out = tmp_path / "run"
    args = [*TINY, f"out_dir={out}", "model.num_modules=3", "train.epochs=30", "pipeline.timeout_s=5"]
    proc, victim = _start_training(3, args, out / "metrics.rank2.jsonl")
    t0 = time.monotonic()
    victim.send_signal(signal.SIGSTOP)
    _, stderr = proc.communicate(timeout=120)
    elapsed = time.monotonic() - t0
    cause = (
        "error: rank 1 (module 1): stuck or dead: its neighbours waited 5 s for it "
        "(pipeline.timeout_s sets this limit)"
    )
    assert proc.returncode == 1, stderr[-3000:]
    assert stderr.splitlines()[-1] == cause, stderr[-3000:]
    assert _errors(stderr) == [cause] and "Traceback" not in stderr
    assert elapsed < 5 + 10, elapsed  # the timeout and a few seconds, not torchrun's 30 s grace


def test_after_sigterm_the_stopped_line_is_the_last_one(tmp_path: Path) -> None:
    # rank 0 records the line instead of printing it, and the launcher prints it after torchrun's
    # own log lines about the stopped workers
    out = tmp_path / "run"
    args = [*TINY, f"out_dir={out}", "train.epochs=30", "checkpoint.every_epochs=0"]
    proc, victim = _start_training(2, args, out / "metrics.rank1.jsonl")
    victim.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last == (
        f"stopped: SIGTERM; the checkpoint in {out / 'checkpoints'} is complete, continue with resume=auto"
    ), stderr[-3000:]
    assert stderr.count("stopped: SIGTERM") == 1 and not _errors(stderr)


def test_a_held_run_folder_ends_the_pipeline_with_exit_status_2(tmp_path: Path) -> None:
    # bad input found by rank 0 (the only rank that locks): the launcher says it last, exit 2
    out = tmp_path / "run"
    with claim(load_config(None, [*TINY, f"out_dir={out}"])):
        result = _launch(2, [*TINY, f"out_dir={out}"])
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: rank 0") and f"is in use by pid {os.getpid()} on host" in last, last
    assert len(_errors(result.stderr)) == 1 and "Traceback" not in result.stderr


def test_a_killed_rank_is_named(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        *TINY,
        f"out_dir={out}",
        "model.num_modules=3",
        "train.epochs=30",
        "debug.slow_module=0",
        "debug.slow_s=0.1",
    ]
    proc, victim = _start_training(3, args, out / "metrics.rank2.jsonl")
    victim.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGKILL, stderr[-3000:]
    assert stderr.splitlines()[-1] == f"error: rank 1 (pid {victim.pid}) was killed by SIGKILL", stderr[
        -3000:
    ]
    assert "Traceback" not in stderr


def test_a_wrong_rendezvous_endpoint_ends_within_the_timeout(tmp_path: Path) -> None:
    # something that is not torchrun's store listens at the endpoint and never answers
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        config = tmp_path / "c.yaml"
        config.write_text("model:\n  num_modules: 2\n")
        env = {
            **_env(),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "NNODES": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RDZV_JOIN_TIMEOUT_S": "10",
            "RDZV_READ_TIMEOUT_S": "5",
        }
        t0 = time.monotonic()
        result = subprocess.run(
            ["bash", "launch/torchrun.sh", str(config), *TINY, f"out_dir={tmp_path / 'run'}"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env=env,
        )
        elapsed = time.monotonic() - t0
    assert result.returncode == 1
    assert elapsed < 60, elapsed
    lines = result.stderr.splitlines()
    assert lines == [
        f"error: something listens at the rendezvous endpoint 127.0.0.1:{port} but does not answer as "
        "torchrun's store within 5 s; check MASTER_ADDR and MASTER_PORT (or --rdzv-endpoint)"
    ], result.stderr[-3000:]
    assert not (tmp_path / "run").exists()
