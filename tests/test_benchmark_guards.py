"""Benchmarks that would measure the wrong thing refuse to, and traces time finished GPU work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT

from trgl_pipe.faults import Tracer


def test_vs_pipelining_on_cuda_refuses_fewer_gpus_than_ranks() -> None:
    if torch.cuda.device_count() >= 2:
        return  # the guard only speaks on a machine with fewer GPUs than ranks
    result = subprocess.run(
        [sys.executable, "benchmarks/vs_pipelining.py", "--device", "cuda", "--k", "2", "--repeats", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: --device cuda needs 2 GPUs")
    assert "Traceback" not in result.stderr


def test_a_trace_on_a_gpu_stamps_after_synchronising(tmp_path: Path, monkeypatch) -> None:
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    device = torch.device("cuda", 1)
    tracer = Tracer(tmp_path / "trace.jsonl", device)
    tracer("consumed", 1, 0, "TRAIN", 0.01)
    tracer("sent", 1, 0, "TRAIN")
    tracer.close()
    assert synced == [device, device]
    cpu = Tracer(tmp_path / "cpu.jsonl", torch.device("cpu"))
    cpu("consumed", 0, 0, "TRAIN")
    cpu.close()
    assert len(synced) == 2
