"""Bounded buffers and waits that cannot hang (threads in one process)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from trgl_pipe.errors import PipelineError
from trgl_pipe.runtime.buffer import LocalControl, Waiter
from trgl_pipe.runtime.messages import Kind, Message
from trgl_pipe.runtime.transport import StagingBuffers, local_link


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
    assert inbox.gate.max_occupancy == capacity  # observed as the consumer takes each message
    assert 1 <= inbox.gate.mean_occupancy <= capacity


def test_a_wait_times_out_with_a_message() -> None:
    outbox, _ = local_link(1, "module 1", "module 2")
    waiter = Waiter(LocalControl(), timeout_s=0.3, who="module 1")
    outbox.send(Message(Kind.TRAIN), waiter)  # the buffer is full: nobody consumes
    t0 = time.monotonic()
    with pytest.raises(PipelineError, match=r"module 1: waited 0.3 s for room in the buffer of module 2"):
        outbox.send(Message(Kind.TRAIN), waiter)
    assert time.monotonic() - t0 < 2


def test_a_wait_stops_when_a_peer_aborts() -> None:
    control = LocalControl()
    outbox, _ = local_link(1, "module 0", "module 1")
    waiter = Waiter(control, timeout_s=30, who="module 0")
    outbox.send(Message(Kind.TRAIN), waiter)
    threading.Timer(0.2, control.abort, args=("module 2 failed: boom",)).start()
    t0 = time.monotonic()
    with pytest.raises(PipelineError, match="stopping because module 2 failed: boom"):
        outbox.send(Message(Kind.TRAIN), waiter)
    assert time.monotonic() - t0 < 5


def test_a_failed_send_ends_the_wait_for_a_staging_buffer_at_once() -> None:
    # Ranks sharing a GPU send through host staging buffers, freed as sends complete. When the
    # send-completion thread fails it frees no more buffers: the wait must raise its error, not
    # run into pipeline.timeout_s with "waited 60 s for rank 1 to receive".
    staging = StagingBuffers([torch.zeros(2), torch.zeros(2)])
    waiter = Waiter(LocalControl(), timeout_s=30, who="rank 0")
    _, first = staging.take(0, waiter, lambda: None, "rank 1 to receive")
    assert not first.is_set()  # in use until its send completes
    failure: list[BaseException] = []
    threading.Timer(
        0.2, lambda: failure.append(PipelineError("rank 0: sending to rank 1 failed (boom)"))
    ).start()
    t0 = time.monotonic()
    with pytest.raises(PipelineError, match="sending to rank 1 failed"):
        staging.take(0, waiter, lambda: failure[0] if failure else None, "rank 1 to receive")
    assert time.monotonic() - t0 < 2


def test_a_staging_buffer_is_reused_once_its_send_completed() -> None:
    staging = StagingBuffers([torch.zeros(2)])
    waiter = Waiter(LocalControl(), timeout_s=5, who="rank 0")
    _, done = staging.take(0, waiter, lambda: None, "x")
    threading.Timer(0.1, done.set).start()
    buffer, _ = staging.take(0, waiter, lambda: None, "x")
    assert buffer is staging.buffers[0]
