"""metrics.jsonl: one JSON object per event, and the memory and version facts runs report."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from trgl_pipe.errors import OutputError


class MetricsLogger:
    """Appends events to a JSON-lines file; safe to share between the threads of one process.

    The file is created by the first event, so a run refused before it starts leaves none. Every
    event is one ``write`` of a whole line; a write that fails (a full disk) is cut back to the
    last whole line and ends the run with one line (:class:`OutputError`).
    """

    def __init__(self, path: Path | None, start_time: float | None = None) -> None:
        self.path = path
        self.start_time = start_time if start_time is not None else time.time()
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._closed = False

    def log(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        record = {"event": event, "time_s": round(time.time() - self.start_time, 4), **fields}
        data = (json.dumps(record) + "\n").encode()
        with self._lock:
            if self._closed:
                return
            end = None
            try:
                if self._fd is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                end = os.fstat(self._fd).st_size
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as error:
                if self._fd is not None and end is not None:
                    with contextlib.suppress(OSError):
                        os.ftruncate(self._fd, end)  # no torn line
                raise OutputError(self.path, error) from error

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All events of a metrics file (a line that is not an event, e.g. cut short by a crash, is skipped)."""
    events = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                events.append(event)
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
