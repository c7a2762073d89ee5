"""Deliberate faults (``debug.*`` keys) for testing how the pipeline fails, and message traces."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trgl_pipe.config import DebugConfig


class InjectedFault(RuntimeError):
    """Raised on purpose by ``debug.raise_at_step``."""

    exit_code = 1  # one line, as any failure of a run (a traceback would hide what the test checks)


def fault_hook(cfg: DebugConfig, module: int) -> Callable[[Any, bool], None] | None:
    """A per-batch hook ``hook(worker, training)`` for module ``module`` that sleeps or raises as
    the debug keys ask."""
    raise_here = cfg.raise_at_step is not None and cfg.raise_on_module == module
    nan_here = cfg.nan_at_step is not None and cfg.raise_on_module == module
    slow_here = cfg.slow_module == module and (cfg.slow_s > 0 or cfg.slow_eval_s > 0)
    if not (raise_here or nan_here or slow_here):
        return None

    def hook(worker: Any, training: bool) -> None:
        if slow_here:
            time.sleep(cfg.slow_s if training else cfg.slow_eval_s)
        step = worker.stage.num_steps + 1
        if training and raise_here and step == cfg.raise_at_step:
            raise InjectedFault(f"debug.raise_at_step={cfg.raise_at_step} reached in module {module}")
        if training and nan_here and step == cfg.nan_at_step:
            with torch.no_grad():
                for p in worker.stage.parameters():
                    p.fill_(float("nan"))

    return hook


class Tracer:
    """Appends ``{"event", "module", "index", "kind", "t"[, "seconds"]}`` lines; ``t`` is
    CLOCK_MONOTONIC, comparable between processes of one host. On a GPU (``device``) each stamp
    is taken after synchronising the device, so it says when the work was done, not queued
    (tracing therefore slows a GPU run)."""

    def __init__(self, path: Path | None, device: Any = None) -> None:
        self._file = open(path, "a", buffering=1) if path is not None else None  # noqa: SIM115
        self._lock = threading.Lock()
        self._device = device if device is not None and getattr(device, "type", "") == "cuda" else None

    def __call__(
        self, event: str, module: int, index: int, kind: str = "", seconds: float | None = None
    ) -> None:
        if self._file is None:
            return
        if self._device is not None:
            torch.cuda.synchronize(self._device)
        record = {"event": event, "module": module, "index": index, "kind": kind, "t": time.monotonic()}
        if seconds is not None:  # how long the worker handled the message (host time)
            record["seconds"] = round(seconds, 6)
        line = json.dumps(record)
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
