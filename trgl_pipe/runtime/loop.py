"""The loop every pipeline worker runs: receive → handle → release → send, until STOP.

The same loop drives the threads of the ``sim`` transport and the torch.distributed ranks; only
the inbox and outbox differ (see :mod:`trgl_pipe.runtime.transport`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from trgl_pipe.live import Publisher
from trgl_pipe.metrics import peak_memory_bytes
from trgl_pipe.runtime.buffer import Waiter
from trgl_pipe.runtime.messages import Kind
from trgl_pipe.runtime.transport import Inbox, Outbox
from trgl_pipe.runtime.worker import StageWorker


def run_worker(
    worker: StageWorker,
    inbox: Inbox,
    outbox: Outbox | None,
    waiter: Waiter,
    publisher: Publisher | None = None,
    poll: Callable[[], Any] | None = None,
    tracer: Callable[[str, int, int], None] | None = None,
) -> None:
    """Process messages until STOP has been handled and passed on."""
    clock = worker.clock
    clock.restart()
    received = sent = 0
    while True:
        t0 = time.perf_counter()
        msg = inbox.recv(waiter)
        clock.recv_wait_s += time.perf_counter() - t0
        out = worker.handle(msg)
        if tracer is not None:  # before the credit goes back, so the sender's next send is later
            tracer("consumed", worker.index, received)
        received += 1
        inbox.release(msg)
        if outbox is not None:
            clock.send_wait_s += outbox.send(out, waiter)
            if tracer is not None:
                tracer("sent", worker.index, sent)
            sent += 1
        if publisher is not None and msg.kind is Kind.TRAIN and publisher.due():
            snapshot = worker.live_snapshot()
            if outbox is not None:
                snapshot["buffer"] = outbox.gate.mean_occupancy
            publisher.publish(snapshot)
        if poll is not None:
            poll()
        if msg.kind is Kind.STOP:
            break
    if outbox is not None:
        outbox.close(waiter)
    inbox.close(waiter)


def worker_stats(worker: StageWorker, outbox: Outbox | None, device: Any, rank: int) -> dict[str, Any]:
    """Per-rank statistics for summary.json."""
    import socket

    clock = worker.clock.as_dict()
    return {
        "rank": rank,
        "modules": [worker.index],
        "device": str(device),
        "host": socket.gethostname(),
        **clock,
        "mean_buffer_occupancy": None if outbox is None else outbox.gate.mean_occupancy,
        "max_buffer_occupancy": None if outbox is None else outbox.gate.max_in_flight,
        "buffer_size": None if outbox is None else outbox.gate.capacity,
        "peak_memory_bytes": peak_memory_bytes(device),
    }
