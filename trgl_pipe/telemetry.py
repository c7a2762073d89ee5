"""What a device is doing: GPU utilisation, memory and power from NVML; CPU% and RSS from psutil.

NVML sees every GPU of the host regardless of ``CUDA_VISIBLE_DEVICES``, so a rank's GPU is found
by its UUID. No NVML (no driver, no GPU) is not an error: the GPU fields are then None. Sampling
is cheap (a few NVML queries) and happens at most once per live-view interval.
"""

from __future__ import annotations

import threading
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


def _gpu_handle(device: torch.device) -> Any:
    nvml = _nvml()
    if nvml is None or device.type != "cuda":
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        if not uuid.startswith("GPU-"):
            uuid = f"GPU-{uuid}"
        return nvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:
        try:
            return nvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:
            return None


class Telemetry:
    """Samples one device and this process; keeps the peaks and means for summary.json."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only starts the measurement
        self._handle = _gpu_handle(device)
        self._samples = 0
        self._util_sum = 0.0
        self._power_sum = 0.0
        self._cpu_sum = 0.0
        self.peak_nvml_used_bytes: int | None = None
        self.peak_rss_bytes = 0

    def sample(self) -> dict[str, Any]:
        """The current figures (None where they do not apply)."""
        rss = int(self._process.memory_info().rss)
        cpu = float(self._process.cpu_percent(None))
        snapshot: dict[str, Any] = {
            "cpu_percent": round(cpu, 1),
            "rss_bytes": rss,
            "gpu_util_percent": None,
            "gpu_memory_used_bytes": None,
            "gpu_memory_total_bytes": None,
            "gpu_power_w": None,
        }
        if self._handle is not None:
            nvml = _nvml()
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(self._handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(self._handle)
                snapshot["gpu_util_percent"] = float(util.gpu)
                snapshot["gpu_memory_used_bytes"] = int(memory.used)
                snapshot["gpu_memory_total_bytes"] = int(memory.total)
                snapshot["gpu_power_w"] = round(nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000, 1)
            except Exception:
                pass
        self._record(snapshot)
        return snapshot

    def _record(self, s: dict[str, Any]) -> None:
        self._samples += 1
        self._cpu_sum += s["cpu_percent"]
        self.peak_rss_bytes = max(self.peak_rss_bytes, s["rss_bytes"])
        if s["gpu_util_percent"] is not None:
            self._util_sum += s["gpu_util_percent"]
        if s["gpu_power_w"] is not None:
            self._power_sum += s["gpu_power_w"]
        used = s["gpu_memory_used_bytes"]
        if used is not None:
            self.peak_nvml_used_bytes = max(self.peak_nvml_used_bytes or 0, used)

    def summary(self) -> dict[str, Any]:
        """Means and peaks over the samples taken, plus torch's own peak on a GPU."""
        last = self.sample()
        n = max(1, self._samples)
        gpu = self._handle is not None and last["gpu_util_percent"] is not None
        return {
            "telemetry_samples": self._samples,
            "cpu_percent_mean": round(self._cpu_sum / n, 1),
            "rss_peak_bytes": self.peak_rss_bytes,
            "cuda_max_memory_allocated_bytes": (
                int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None
            ),
            "nvml_memory_used_peak_bytes": self.peak_nvml_used_bytes,
            "gpu_memory_total_bytes": last["gpu_memory_total_bytes"],
            "gpu_util_percent_mean": round(self._util_sum / n, 1) if gpu else None,
            "gpu_power_w_mean": round(self._power_sum / n, 1) if gpu else None,
        }
