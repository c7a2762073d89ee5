"""Device telemetry: CPU figures from psutil, GPU figures from NVML where there is one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trgl_pipe import telemetry
from trgl_pipe.single import run_single
from trgl_pipe.telemetry import Telemetry


def test_without_a_gpu_the_gpu_fields_are_none_not_an_error() -> None:
    probe = Telemetry(torch.device("cpu"))
    sample = probe.sample()
    assert sample["rss_bytes"] > 10 * 2**20 and sample["cpu_percent"] >= 0
    assert sample["gpu_util_percent"] is None and sample["gpu_memory_used_bytes"] is None
    summary = probe.summary()
    assert summary["telemetry_samples"] == 2 and summary["rss_peak_bytes"] >= sample["rss_bytes"]
    assert summary["cuda_max_memory_allocated_bytes"] is None and summary["gpu_util_percent_mean"] is None


def test_nvml_failing_to_start_leaves_the_gpu_fields_empty(monkeypatch) -> None:
    import pynvml

    def broken() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", broken)
    monkeypatch.setitem(telemetry._nvml_state, "tried", False)
    monkeypatch.setitem(telemetry._nvml_state, "module", None)
    assert telemetry._nvml() is None
    assert telemetry._gpu_handle(torch.device("cuda", 0)) is None


def test_summary_json_carries_the_telemetry_of_each_rank(tiny) -> None:
    cfg = tiny()
    run_single(cfg, console_summary=False)
    (rank,) = json.loads((Path(cfg.out_dir) / "summary.json").read_text())["ranks"]
    for key in ("telemetry_samples", "cpu_percent_mean", "rss_peak_bytes", "clock"):
        assert rank[key] is not None, key
    for key in ("cuda_max_memory_allocated_bytes", "nvml_memory_used_peak_bytes", "gpu_util_percent_mean"):
        assert key in rank and rank[key] is None, key  # on the CPU: null, documented in docs/outputs.md
    assert rank["clock"] == "host"
