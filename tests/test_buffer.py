"""Bounded buffers and waits that cannot hang (threads in one process)."""

from __future__ import annotations

import threading
import time

import pytest

from trgl_pipe.errors import PipelineError
from trgl_pipe.runtime.buffer import CreditGate, LocalControl, Waiter
from trgl_pipe.runtime.messages import Kind, Message
from trgl_pipe.runtime.transport import local_link


def test_sender_is_never_more_than_capacity_ahead() -> None:
    capacity = 3
    outbox, inbox = local_link(capacity, "producer", "consumer")
    waiter = Waiter(LocalControl(), timeout_s=10, who="test")
    consumed = 0
    ahead = []
    lock = threading.Lock()

    def consume() -> None:
        nonlocal consumed
        for _ in range(30):
            msg = inbox.recv(waiter)
            time.sleep(0.005)  # a slow consumer
            with lock:
                consumed += 1
            inbox.release(msg)

    thread = threading.Thread(target=consume)
    thread.start()
    for i in range(30):
        outbox.send(Message(Kind.TRAIN, step=i), waiter)
        with lock:
            ahead.append(i + 1 - consumed)  # messages sent but not yet consumed
    thread.join()
    assert max(ahead) == capacity  # it does fill the buffer...
    assert all(a <= capacity for a in ahead)  # ...and never goes beyond
    assert outbox.gate.max_in_flight == capacity
    assert 1 <= outbox.gate.mean_occupancy <= capacity


def test_a_wait_times_out_with_a_message() -> None:
    gate = CreditGate(1)
    waiter = Waiter(LocalControl(), timeout_s=0.3, who="module 1")
    gate.acquire(waiter, "room")
    t0 = time.monotonic()
    with pytest.raises(PipelineError, match=r"module 1: waited 0.3 s for room in the buffer"):
        gate.acquire(waiter, "room in the buffer")
    assert time.monotonic() - t0 < 2


def test_a_wait_stops_when_a_peer_aborts() -> None:
    control = LocalControl()
    gate = CreditGate(1)
    waiter = Waiter(control, timeout_s=30, who="module 0")
    gate.acquire(waiter, "room")
    threading.Timer(0.2, control.abort, args=("module 2 failed: boom",)).start()
    t0 = time.monotonic()
    with pytest.raises(PipelineError, match="stopping because module 2 failed: boom"):
        gate.acquire(waiter, "room")
    assert time.monotonic() - t0 < 5
