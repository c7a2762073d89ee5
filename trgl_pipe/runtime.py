"""The loop every pipeline worker runs: receive → handle → release → send, until STOP.

The same loop drives the threads of the ``sim`` transport and the torch.distributed ranks; only
the inbox and outbox differ (see :mod:`trgl_pipe.transport`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trgl_pipe.buffer import LocalControl, Waiter
from trgl_pipe.errors import PipelineError
from trgl_pipe.faults import Tracer
from trgl_pipe.live import LiveView, LocalBoard, Publisher
from trgl_pipe.messages import Kind
from trgl_pipe.metrics import peak_memory_bytes
from trgl_pipe.schedule import Position, parallel_stream
from trgl_pipe.transport import Inbox, Outbox, StreamInbox, local_link
from trgl_pipe.worker import StageWorker


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


def run_simulated(
    ctx: Any, workers: list[StageWorker], progress: Any = None, should_stop: Any = None
) -> list[dict[str, Any]]:
    """The pipeline inside one process: one thread per module, bounded in-process buffers.

    Returns per-worker statistics. If a worker fails, the others stop within
    ``pipeline.timeout_s`` and the first failure is raised here.
    """
    cfg = ctx.cfg
    k = len(workers)
    start = Position(progress.epoch, progress.batch, progress.step) if progress else Position()
    control = LocalControl()
    links = [local_link(cfg.pipeline.buffer_size, f"module {i}", f"module {i + 1}") for i in range(k - 1)]
    inboxes = [
        StreamInbox(parallel_stream(cfg, ctx.batches, start, should_stop or (lambda: False))),
        *(inbox for _, inbox in links),
    ]
    outboxes = [*(outbox for outbox, _ in links), None]
    board = LocalBoard()
    errors: list[BaseException] = []
    tracer = Tracer(Path(cfg.out_dir) / "trace.jsonl" if cfg.debug.trace else None)

    def body(i: int) -> None:
        waiter = Waiter(control, cfg.pipeline.timeout_s, f"module {i}")
        publisher = Publisher(board, i, cfg.log.live_interval_s)
        try:
            run_worker(workers[i], inboxes[i], outboxes[i], waiter, publisher, tracer=tracer)
        except BaseException as error:
            errors.append(error)
            if not isinstance(error, PipelineError) or not control.aborted:
                control.abort(f"module {i} failed: {error}")

    threads = [threading.Thread(target=body, args=(i,), name=f"module-{i}", daemon=True) for i in range(k)]
    with LiveView(board, cfg.log.live, cfg.log.live_interval_s, "trgl_pipe · sim pipeline"):
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
    tracer.close()
    if errors:
        primary = [e for e in errors if not isinstance(e, PipelineError)]
        raise (primary or errors)[0]
    return [worker_stats(w, outboxes[i], ctx.device, i) for i, w in enumerate(workers)]
