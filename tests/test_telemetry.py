"""Device telemetry: CPU figures from psutil, GPU figures from NVML where there is one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trgl_pipe.training.single import run_single
from trgl_pipe.watch import telemetry
from trgl_pipe.watch.telemetry import Telemetry


def test_without_a_gpu_the_gpu_fields_are_none_not_an_error() -> None:
    probe = Telemetry(torch.device("cpu"))
    sample = probe.sample()
    assert sample["rss_bytes"] > 10 * 2**20 and sample["cpu_percent"] >= 0
    assert sample["gpu_device_util_percent"] is None and sample["gpu_device_memory_used_bytes"] is None
    assert sample["gpu_process_memory_bytes"] is None
    summary = probe.summary()
    assert summary["telemetry_samples"] == 2 and summary["rss_peak_bytes"] >= sample["rss_bytes"]
    assert (
        summary["cuda_max_memory_allocated_bytes"] is None and summary["gpu_device_util_percent_mean"] is None
    )


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
    for key in (
        "cuda_max_memory_allocated_bytes",
        "nvml_process_memory_peak_bytes",
        "nvml_device_memory_used_peak_bytes",
        "gpu_device_util_percent_mean",
    ):
        assert key in rank and rank[key] is None, key  # on the CPU: null, documented in docs/outputs.md
    assert rank["clock"] == "host"


class FakeNvml:
    """Two processes on one GPU, as NVML reports them."""

    class Proc:
        def __init__(self, pid: int, used: int) -> None:
            self.pid, self.usedGpuMemory = pid, used

    class Util:
        def __init__(self, pid: int, sm: int, stamp: int) -> None:
            self.pid, self.smUtil, self.timeStamp = pid, sm, stamp

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.asked: list[str] = []

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self.asked.append(uuid)
        if uuid != "MIG-1234":
            raise RuntimeError("not found")
        return "handle"

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        raise AssertionError("a GPU must never be picked by index")

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [self.Proc(self.pid + 1, 30 * 2**30), self.Proc(self.pid, 5 * 2**30)]

    def nvmlDeviceGetProcessUtilization(self, handle, since):
        return [self.Util(self.pid + 1, 90, 2), self.Util(self.pid, 20, 1), self.Util(self.pid, 40, 3)]


def test_a_gpu_is_found_by_uuid_and_a_rank_reports_its_own_share(monkeypatch) -> None:
    import os

    fake = FakeNvml(os.getpid())
    monkeypatch.setitem(telemetry._nvml_state, "tried", True)
    monkeypatch.setitem(telemetry._nvml_state, "module", fake)

    class Props:
        uuid = "1234"

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    assert telemetry._gpu_handle(torch.device("cuda", 3)) == "handle"
    assert fake.asked == ["GPU-1234", "MIG-1234"]  # a MIG instance by its UUID, never an index
    memory, sm = telemetry._process_figures(fake, "handle", os.getpid(), 0)
    assert memory == 5 * 2**30 and sm == 40.0  # this process's, the latest sample; not the device's
