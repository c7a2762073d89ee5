"""The loop every pipeline worker runs: receive → handle → release → send, until STOP.

A worker is a chain of one or more consecutive modules (``pipeline.modules_per_rank``): each
module steps on its own loss right after its forward and hands its detached output to the next,
exactly as the single-process parallel regime does. The same loop drives the threads of the
``sim`` transport and the torch.distributed ranks; only the inbox and outbox differ (see
:mod:`trgl_pipe.runtime.transport`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from trgl_pipe.runtime.buffer import Waiter
from trgl_pipe.runtime.clock import Clock
from trgl_pipe.runtime.messages import Kind, Message
from trgl_pipe.runtime.transport import Inbox, Outbox
from trgl_pipe.training.worker import StageWorker
from trgl_pipe.watch.live import Publisher
from trgl_pipe.watch.metrics import peak_memory_bytes
from trgl_pipe.watch.spans import CATEGORY_OF_KIND, SpanRecorder
from trgl_pipe.watch.telemetry import Telemetry


def handle_chain(chain: Sequence[StageWorker], msg: Message) -> Message:
    """Pass ``msg`` through consecutive modules in order (no locking between them)."""
    for worker in chain:
        msg = worker.handle(msg)
    return msg


def _own_memory(out: Message, msg: Message) -> Message:
    """``out`` with an activation of its own when it shares memory with the input's: the input is
    a receive slot, refilled as soon as it is released (before ``out`` is sent), so a module that
    returns a view of its input (a flatten, an identity) would otherwise send the next message."""
    if (
        out.x is not None
        and msg.x is not None
        and out.x.untyped_storage().data_ptr() == msg.x.untyped_storage().data_ptr()
    ):
        return out.forward(out.x.clone(), out.image)
    return out


def run_worker(
    chain: Sequence[StageWorker],
    inbox: Inbox,
    outbox: Outbox | None,
    waiter: Waiter,
    clock: Clock,
    publishers: Sequence[Publisher] = (),
    poll: Callable[[], Any] | None = None,
    tracer: Callable[..., None] | None = None,
    monitor: tuple[Publisher, Telemetry] | None = None,
    spans: SpanRecorder | None = None,
) -> Message:
    """Process messages until STOP has been handled and passed on; returns the STOP message.

    ``spans`` records the loop's contiguous spans for the timeline (input, handling, room).
    """
    spans = spans or SpanRecorder(None, {})
    for worker in chain:
        worker.restart_clock()
    spans.start()
    trace_id = chain[0].index
    received = sent = 0
    while True:
        clock.waiting_for_input()
        t0 = time.perf_counter()
        msg = inbox.recv(waiter)
        t1 = time.perf_counter()
        clock.add_wait("recv_wait", t1 - t0)
        spans.until("input")
        out = _own_memory(handle_chain(chain, msg), msg)
        if tracer is not None:  # before the slot's receive is posted again: the next send is later
            tracer("consumed", trace_id, received, msg.kind.name, time.perf_counter() - t1)
        received += 1
        inbox.release(msg)
        spans.until(CATEGORY_OF_KIND[msg.kind])
        if outbox is not None:
            clock.add_wait("send_wait", outbox.send(out, waiter))
            spans.until("room")
            if tracer is not None:
                tracer("sent", trace_id, sent, out.kind.name)
            sent += 1
        if msg.kind is Kind.TRAIN:
            for worker, publisher in zip(chain, publishers, strict=False):
                if publisher.due():
                    snapshot = worker.live_snapshot()
                    snapshot["recv_wait_s"] = round(clock.total("recv_wait"), 2)
                    snapshot["send_wait_s"] = round(clock.total("send_wait"), 2)
                    if inbox.gate is not None:
                        snapshot["buffer"] = inbox.gate.mean_occupancy
                    publisher.publish(snapshot)
            if monitor is not None and monitor[0].due():
                monitor[0].publish({**monitor[1].sample(), **rank_progress(chain, clock)})
        if poll is not None:
            poll()
        if msg.kind is Kind.STOP:
            break
    if outbox is not None:
        outbox.close(waiter)
    inbox.close(waiter)
    clock.settle()
    return msg


def rank_progress(chain: Sequence[StageWorker], clock: Clock) -> dict[str, Any]:
    """Where this rank's time went so far, for the watchers (TensorBoard, W&B) on rank 0."""
    return {
        "step": chain[0].stage.num_steps,
        "elapsed_s": round(max(w.elapsed_s for w in chain), 3),
        "train_samples": chain[0].train_samples,
        "compute_s": round(sum(w.compute_s for w in chain), 3),
        "recv_wait_s": round(clock.total("recv_wait"), 3),
        "send_wait_s": round(clock.total("send_wait"), 3),
    }


def rank_stats(
    chain: Sequence[StageWorker],
    inbox: Inbox | None,
    outbox: Outbox | None,
    clock: Clock,
    device: Any,
    rank: int,
) -> dict[str, Any]:
    """Per-rank (or per-thread) statistics for summary.json; the buffer's are those of the rank's
    input (the link from the rank before), counted where messages are taken."""
    gate = None if inbox is None else inbox.gate
    elapsed = max(w.elapsed_s for w in chain)
    samples = chain[0].train_samples
    return {
        "rank": rank,
        "modules": [w.index for w in chain],
        "device": str(device),
        "host": socket.gethostname(),
        "clock": clock.kind,
        "elapsed_s": round(elapsed, 4),
        "train_samples": samples,
        "samples_per_s": round(samples / elapsed, 2) if elapsed > 0 else 0.0,
        "compute_s": round(sum(w.compute_s for w in chain), 4),
        "train_compute_s": round(sum(w.train_compute_s for w in chain), 4),
        "recv_wait_s": round(clock.total("recv_wait"), 4),
        "send_wait_s": round(clock.total("send_wait"), 4),
        # the input buffer: messages arrived and not consumed when one is taken (at most buffer_size)
        "mean_buffer_occupancy": None if gate is None else gate.mean_occupancy,
        "max_buffer_occupancy": None if gate is None else gate.max_occupancy,
        "buffer_size": None if gate is None else gate.capacity,
        # bytes sent to the next rank: activations, and input images (an objective that reads them)
        "sent_bytes": getattr(outbox, "sent_bytes", None),
        "image_sent_bytes": getattr(outbox, "image_sent_bytes", None),
        "peak_memory_bytes": peak_memory_bytes(device),
    }
