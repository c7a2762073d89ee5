"""What a device is doing: GPU utilisation, memory and power from NVML; CPU% and RSS from psutil.

NVML sees every GPU of the host regardless of ``CUDA_VISIBLE_DEVICES``, so a rank's GPU (or MIG
instance) is found by its UUID, never by index. NVML's utilisation, memory and power are those
of the whole device, whoever uses it (ranks sharing a GPU see the same numbers): they are named
``gpu_device_*``. This process's own share is ``gpu_process_*``: its memory and its SM
utilisation, where NVML reports per-process figures. No NVML (no driver, no GPU) is not an
error: the GPU fields are then None. Sampling is cheap (a few NVML queries) and happens at most
once per live-view interval.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil
import torch

_nvml_lock = threading.Lock()
_nvml_state: dict[str, Any] = {"tried": False, "module": None}


def _nvml() -> Any:
    """The pynvml module once initialised, or None when NVML is not usable here."""
    with _nvml_lock:
        if not _nvml_state["tried"]:
            _nvml_state["tried"] = True
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_state["module"] = pynvml
            except Exception:  # no driver, no library, no GPU: telemetry without GPU figures
                _nvml_state["module"] = None
        return _nvml_state["module"]


def _uuid_candidates(uuid: str) -> list[str]:
    """NVML names a GPU ``GPU-<uuid>`` and a MIG instance ``MIG-<uuid>``; torch may give either
    form, or the bare UUID."""
    if uuid.startswith(("GPU-", "MIG-")):
        return [uuid]
    return [f"GPU-{uuid}", f"MIG-{uuid}"]


def _gpu_handle(device: torch.device) -> Any:
    """The NVML handle of ``device`` found by UUID, or None (an index would name another GPU
    under CUDA_VISIBLE_DEVICES or MIG, so there is no fallback to one)."""
    nvml = _nvml()
    if nvml is None or device.type != "cuda":
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except Exception:
        return None
    for candidate in _uuid_candidates(uuid):
        try:
            return nvml.nvmlDeviceGetHandleByUUID(candidate)
        except Exception:
            continue
    return None


def _process_figures(nvml: Any, handle: Any, pid: int, since_us: int) -> tuple[int | None, float | None]:
    """This process's GPU memory (bytes) and SM utilisation (%) since ``since_us``, where NVML has them."""
    memory = None
    try:
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                memory = int(proc.usedGpuMemory)
    except Exception:
        pass
    sm = None
    try:
        samples = [u for u in nvml.nvmlDeviceGetProcessUtilization(handle, since_us) if u.pid == pid]
        if samples:
            sm = float(max(samples, key=lambda u: u.timeStamp).smUtil)
    except Exception:
        pass
    return memory, sm


class Telemetry:
    """Samples one device and this process; keeps the peaks and means for summary.json."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only starts the measurement
        self._handle = _gpu_handle(device)
        self._last_us = int(time.time() * 1e6)
        self._samples = 0
        self._util_sum = 0.0
        self._power_sum = 0.0
        self._sm_sum = 0.0
        self._sm_samples = 0
        self._cpu_sum = 0.0
        self.peak_nvml_used_bytes: int | None = None
        self.peak_process_bytes: int | None = None
        self.peak_rss_bytes = 0

    def sample(self) -> dict[str, Any]:
        """The current figures (None where they do not apply)."""
        rss = int(self._process.memory_info().rss)
        cpu = float(self._process.cpu_percent(None))
        snapshot: dict[str, Any] = {
            "cpu_percent": round(cpu, 1),
            "rss_bytes": rss,
            "gpu_process_memory_bytes": None,
            "gpu_process_sm_percent": None,
            "gpu_device_util_percent": None,
            "gpu_device_memory_used_bytes": None,
            "gpu_memory_total_bytes": None,
            "gpu_device_power_w": None,
        }
        if self._handle is not None:
            nvml = _nvml()
            now_us = int(time.time() * 1e6)
            memory_bytes, sm = _process_figures(nvml, self._handle, self._process.pid, self._last_us)
            self._last_us = now_us
            snapshot["gpu_process_memory_bytes"] = memory_bytes
            snapshot["gpu_process_sm_percent"] = sm
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(self._handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(self._handle)
                snapshot["gpu_device_util_percent"] = float(util.gpu)
                snapshot["gpu_device_memory_used_bytes"] = int(memory.used)
                snapshot["gpu_memory_total_bytes"] = int(memory.total)
                snapshot["gpu_device_power_w"] = round(nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000, 1)
            except Exception:
                pass
        self._record(snapshot)
        return snapshot

    def _record(self, s: dict[str, Any]) -> None:
        self._samples += 1
        self._cpu_sum += s["cpu_percent"]
        self.peak_rss_bytes = max(self.peak_rss_bytes, s["rss_bytes"])
        if s["gpu_device_util_percent"] is not None:
            self._util_sum += s["gpu_device_util_percent"]
        if s["gpu_device_power_w"] is not None:
            self._power_sum += s["gpu_device_power_w"]
        if s["gpu_process_sm_percent"] is not None:
            self._sm_sum += s["gpu_process_sm_percent"]
            self._sm_samples += 1
        used = s["gpu_device_memory_used_bytes"]
        if used is not None:
            self.peak_nvml_used_bytes = max(self.peak_nvml_used_bytes or 0, used)
        mine = s["gpu_process_memory_bytes"]
        if mine is not None:
            self.peak_process_bytes = max(self.peak_process_bytes or 0, mine)

    def summary(self) -> dict[str, Any]:
        """Means and peaks over the samples taken, plus torch's own peak on a GPU."""
        last = self.sample()
        n = max(1, self._samples)
        gpu = self._handle is not None and last["gpu_device_util_percent"] is not None
        return {
            "telemetry_samples": self._samples,
            "cpu_percent_mean": round(self._cpu_sum / n, 1),
            "rss_peak_bytes": self.peak_rss_bytes,
            "cuda_max_memory_allocated_bytes": (
                int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None
            ),
            "nvml_process_memory_peak_bytes": self.peak_process_bytes,
            "gpu_process_sm_percent_mean": (
                round(self._sm_sum / self._sm_samples, 1) if self._sm_samples else None
            ),
            "nvml_device_memory_used_peak_bytes": self.peak_nvml_used_bytes,
            "gpu_memory_total_bytes": last["gpu_memory_total_bytes"],
            "gpu_device_util_percent_mean": round(self._util_sum / n, 1) if gpu else None,
            "gpu_device_power_w_mean": round(self._power_sum / n, 1) if gpu else None,
        }
