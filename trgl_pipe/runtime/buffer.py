"""A bounded batch buffer's statistics, and waits that cannot hang.

A link holds at most ``capacity`` messages that the receiver has not yet *consumed* (trained on
and stepped), so the sender is never far ahead of its receiver and no queue grows with the data.
How each transport bounds it: :mod:`trgl_pipe.runtime.transport`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from trgl_pipe.errors import PipelineError

T = TypeVar("T")


class Control(Protocol):
    """How a worker learns that another worker failed, and tells the others when it fails."""

    def check(self) -> None:
        """Raise :class:`PipelineError` if a peer has aborted the run."""

    def abort(self, message: str) -> None:
        """Tell every peer to stop, with ``message`` naming the failure."""


class LocalControl:
    """Abort flag shared by the threads of one process."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._message = ""
        self._lock = threading.Lock()

    def check(self) -> None:
        if self._event.is_set():
            raise PipelineError(f"stopping because {self._message}")

    def abort(self, message: str) -> None:
        with self._lock:
            if not self._event.is_set():
                self._message = message
                self._event.set()

    @property
    def aborted(self) -> bool:
        return self._event.is_set()


class Waiter:
    """Waits for something a peer must provide: gives up after ``timeout_s`` or on abort."""

    def __init__(self, control: Control, timeout_s: float, who: str, poll_s: float = 0.2) -> None:
        self.control = control
        self.timeout_s = timeout_s
        self.who = who
        self.poll_s = min(poll_s, timeout_s)

    def wait(self, attempt: Callable[[float], T | None], what: str) -> T:
        """Call ``attempt(poll_s)`` (which blocks at most poll_s) until it returns a value."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            result = attempt(self.poll_s)
            if result is not None:
                return result
            self.control.check()
            if time.monotonic() > deadline:
                raise PipelineError(
                    f"{self.who}: waited {self.timeout_s:g} s for {what}; that peer is stuck or "
                    "dead (pipeline.timeout_s sets this limit)"
                )


class Occupancy:
    """A buffer's occupancy statistics for the run's summary: the messages there (arrived and not
    yet consumed) observed each time the receiver takes one, that one included. Not locked: one
    thread observes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.max_occupancy = 0
        self._occupancy_sum = 0
        self._observations = 0

    def observe(self, occupancy: int) -> None:
        """Record the buffer's occupancy now (for the mean and the maximum)."""
        self.max_occupancy = max(self.max_occupancy, occupancy)
        self._occupancy_sum += occupancy
        self._observations += 1

    @property
    def mean_occupancy(self) -> float | None:
        """Average number of messages in the buffer at each observation."""
        return self._occupancy_sum / self._observations if self._observations else None
