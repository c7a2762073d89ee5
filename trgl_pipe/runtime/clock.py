"""Where a rank's time goes: compute, waiting for input, waiting for room downstream.

On the CPU the host clock measures everything. On a GPU the host only queues work, so host times
would count GPU stalls as compute and leave the transfer out of the input wait. There the clock
records CUDA events around every compute region on the training stream: ``compute`` is GPU time
inside the regions and ``recv_wait`` is the GPU's idle time between consecutive regions (waiting
for the input to arrive, the transfer included, or for the host). ``send_wait`` (the host blocked
on credits: backpressure) is a host time on both. Events are read once they have completed, so
the clock never forces a host synchronisation in the training loop.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from typing import Protocol

import torch


class Clock(Protocol):
    kind: str  # "host" or "cuda_events", recorded in summary.json

    def region(self, key: str) -> contextlib.AbstractContextManager[None]: ...

    def add_wait(self, key: str, seconds: float) -> None: ...

    def settle(self) -> None: ...

    def total(self, key: str) -> float: ...


class HostClock:
    """Wall-clock seconds of the host."""

    kind = "host"

    def __init__(self) -> None:
        self._totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def region(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._totals[key] += time.perf_counter() - t0

    def add_wait(self, key: str, seconds: float) -> None:
        self._totals[key] += seconds

    def settle(self) -> None:
        pass

    def total(self, key: str) -> float:
        return self._totals[key]


class CudaEventClock:
    """GPU seconds from CUDA events on the current stream of ``device``."""

    kind = "cuda_events"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._totals: dict[str, float] = defaultdict(float)
        self._pending: deque[tuple[str, torch.cuda.Event, torch.cuda.Event]] = deque()
        self._last_end: torch.cuda.Event | None = None

    @contextlib.contextmanager
    def region(self, key: str) -> Iterator[None]:
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        try:
            yield
        finally:
            end.record()
            self._pending.append((key, begin, end))
            self._collect(wait=False)

    def _collect(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0][2].query()):
            key, begin, end = self._pending.popleft()
            self._totals[key] += begin.elapsed_time(end) / 1e3
            if self._last_end is not None:
                self._totals["recv_wait"] += self._last_end.elapsed_time(begin) / 1e3
            self._last_end = end

    def add_wait(self, key: str, seconds: float) -> None:
        if key != "recv_wait":  # the input wait is the GPU's idle time between regions
            self._totals[key] += seconds

    def settle(self) -> None:
        """Wait for the GPU and account for every region (once, at the end)."""
        torch.cuda.synchronize(self.device)
        self._collect(wait=True)

    def total(self, key: str) -> float:
        return self._totals[key]


def clock_for(device: torch.device) -> Clock:
    return CudaEventClock(device) if device.type == "cuda" else HostClock()
