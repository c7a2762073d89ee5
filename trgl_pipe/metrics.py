"""metrics.jsonl: one JSON object per event, and the memory and version facts runs report."""

from __future__ import annotations

import json
import platform
import resource
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import torch


class MetricsLogger:
    """Appends events to a JSON-lines file; safe to share between the threads of one process."""

    def __init__(self, path: Path | None, start_time: float | None = None) -> None:
        self.path = path
        self.start_time = start_time if start_time is not None else time.time()
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)  # noqa: SIM115 - kept open for the run

    def log(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"event": event, "time_s": round(time.time() - self.start_time, 4), **fields}
        line = json.dumps(record)
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All events of a metrics file (a last line cut short by a crash is skipped)."""
    events = []
    with open(path) as handle:
        for line in handle:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory on GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def versions() -> dict[str, str]:
    import trgl_pipe

    info = {
        "trgl_pipe": trgl_pipe.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
    }
    if torch.cuda.is_available():
        info["cuda"] = str(torch.version.cuda)
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe_argv() -> str:
    return " ".join(sys.argv)
