"""The pipeline inside one process (``pipeline.transport=sim``): one thread per module.

The threads run the same loop as the ranks (:func:`trgl_pipe.training.loop.run_worker`) with
in-process bounded buffers; a test checks that this computes exactly what the synchronous
parallel regime computes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from trgl_pipe.context import RunContext
from trgl_pipe.errors import PipelineError
from trgl_pipe.faults import Tracer
from trgl_pipe.runtime.buffer import LocalControl, Waiter
from trgl_pipe.runtime.schedule import Position, parallel_stream
from trgl_pipe.runtime.transport import StreamInbox, local_link
from trgl_pipe.training.from_next import link_workers
from trgl_pipe.training.loop import rank_stats, run_worker
from trgl_pipe.training.worker import StageWorker
from trgl_pipe.watch.live import LiveView, LocalBoard, Publisher
from trgl_pipe.watch.spans import SpanRecorder
from trgl_pipe.watch.telemetry import Telemetry


def run_simulated(
    ctx: RunContext,
    workers: list[StageWorker],
    progress: Any = None,
    should_stop: Any = None,
    telemetry: Telemetry | None = None,
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

    waiters = [Waiter(control, cfg.pipeline.timeout_s, f"module {i}") for i in range(k)]
    link_workers(workers, waiters)

    def body(i: int) -> None:
        waiter = waiters[i]
        publisher = Publisher(board, f"module/{i}", cfg.log.live_interval_s)
        path = Path(cfg.out_dir) / "spans" / f"rank{i}.tsv" if cfg.log.timeline else None
        spans = SpanRecorder(path, {"rank": i, "modules": [i], "thread": True}, append=progress is not None)
        try:
            run_worker(
                [workers[i]],
                inboxes[i],
                outboxes[i],
                waiter,
                workers[i].clock,
                [publisher],
                tracer=tracer,
                spans=spans,
            )
        except BaseException as error:
            errors.append(error)
            if not isinstance(error, PipelineError) or not control.aborted:
                control.abort(f"module {i} failed: {error}")
        finally:
            spans.close()

    threads = [threading.Thread(target=body, args=(i,), name=f"module-{i}", daemon=True) for i in range(k)]
    with LiveView(board, cfg.log.live, cfg.log.live_interval_s, "trgl_pipe · sim pipeline", telemetry):
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
    tracer.close()
    if errors:
        primary = [e for e in errors if not isinstance(e, PipelineError)]
        raise (primary or errors)[0]
    device = telemetry.summary() if telemetry is not None else {}
    return [
        {**rank_stats([w], inboxes[i], outboxes[i], w.clock, ctx.device, i), **device}
        for i, w in enumerate(workers)
    ]
