"""Bounded batch buffers seen from the sender (credits), and waits that cannot hang.

A sender holds ``capacity`` credits towards the next module. Sending takes one; the receiver
hands one back once it has *consumed* a message (trained on it and stepped). So the sender is
never more than ``capacity`` messages ahead of its receiver, and no queue grows with the data.
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
    """The sender's count of the receiver's buffer: messages sent and not yet consumed, and the
    statistics the run's summary shows. Not locked: the link that owns it counts under its lock."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0  # sent and not yet consumed
        self.max_in_flight = 0
        self._occupancy_sum = 0
        self._sends = 0

    def count_send(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._occupancy_sum += self.in_flight
        self._sends += 1

    def count_consumed(self) -> None:
        self.in_flight -= 1

    @property
    def mean_occupancy(self) -> float | None:
        """Average number of messages in the buffer (including the one being sent) at each send."""
        return self._occupancy_sum / self._sends if self._sends else None


class CreditGate(Occupancy):
    """The sender's view of the receiver's buffer: ``capacity`` credits and occupancy statistics."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._credits = threading.Semaphore(capacity)
        self._lock = threading.Lock()

    def acquire(
        self, waiter: Waiter, what: str, error: Callable[[], BaseException | None] = lambda: None
    ) -> float:
        """Take a credit (waiting for the receiver if none is left); returns the seconds waited."""
        t0 = time.perf_counter()
        if not self._credits.acquire(blocking=False):

            def attempt(timeout: float) -> bool | None:
                failure = error()
                if failure is not None:
                    raise failure
                return True if self._credits.acquire(timeout=timeout) else None

            waiter.wait(attempt, what)
        waited = time.perf_counter() - t0
        with self._lock:
            self.count_send()
        return waited

    def release(self) -> None:
        """The receiver consumed one message: one more credit."""
        with self._lock:
            self.count_consumed()
        self._credits.release()
