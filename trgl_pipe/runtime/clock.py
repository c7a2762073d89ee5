"""Where a rank's time goes: compute, waiting for input, waiting for room downstream.

On the CPU the host clock measures everything. On a GPU the host only queues work, so host times
would count GPU stalls as compute and leave the transfer out of the input wait. There the clock
records CUDA events around every compute region on the training stream: ``compute`` is GPU time
inside the regions and ``recv_wait`` is the GPU's idle time from the moment the loop starts
waiting for its next message (:meth:`Clock.waiting_for_input`) to the next region (the transfer
included). The GPU's idle time before that moment, while the host sends or waits for room
downstream, is not input wait: ``send_wait`` (the host waiting for its previous message to land
in the next rank's buffer: backpressure) is a host time on
both clocks. Events are read once they have completed, so the clock never forces a host
synchronisation in the training loop, and they are reused, not made per batch.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from typing import Any, Protocol

import torch


class Clock(Protocol):
    kind: str  # "host" or "cuda_events", recorded in summary.json

    def region(self, key: str) -> contextlib.AbstractContextManager[None]: ...

    def add_wait(self, key: str, seconds: float) -> None: ...

    def waiting_for_input(self) -> None: ...

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

    def waiting_for_input(self) -> None:
        pass  # the host measures the input wait itself (add_wait)

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
        # (key, begin, end, the input-wait mark before begin or None)
        self._pending: deque[tuple[str, Any, Any, Any]] = deque()
        self._last_end: Any = None
        self._mark: Any = None
        self._marks = False  # the loop marks its input waits: gaps without a mark are not input
        self._free: list[Any] = []  # completed events, reused

    def _event(self) -> Any:
        event = self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def waiting_for_input(self) -> None:
        """The host starts waiting for the next message: GPU idle time from here is input wait."""
        self._marks = True
        if self._mark is None:  # else a marker message came in between: move the mark here
            self._mark = self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)
        self._mark.record()

    @contextlib.contextmanager
    def region(self, key: str) -> Iterator[None]:
        mark, self._mark = self._mark, None
        begin = self._event()
        try:
            yield
        finally:
            self._pending.append((key, begin, self._event(), mark))
            self._collect(wait=False)

    def _collect(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0][2].query()):
            key, begin, end, mark = self._pending.popleft()
            self._totals[key] += begin.elapsed_time(end) / 1e3
            if mark is not None:
                self._totals["recv_wait"] += max(0.0, mark.elapsed_time(begin)) / 1e3
                self._free.append(mark)
            elif self._last_end is not None and not self._marks:
                self._totals["recv_wait"] += self._last_end.elapsed_time(begin) / 1e3
            if self._last_end is not None:
                self._free.append(self._last_end)
            self._free.append(begin)
            self._last_end = end

    def add_wait(self, key: str, seconds: float) -> None:
        if key != "recv_wait":  # the input wait is the GPU's idle time after the mark
            self._totals[key] += seconds

    def settle(self) -> None:
        """Wait for the GPU and account for every region (once, at the end)."""
        torch.cuda.synchronize(self.device)
        self._collect(wait=True)

    def total(self, key: str) -> float:
        return self._totals[key]


def clock_for(device: torch.device) -> Clock:
    return CudaEventClock(device) if device.type == "cuda" else HostClock()
