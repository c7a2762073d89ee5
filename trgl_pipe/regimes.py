"""The single-process regimes: end-to-end, parallel, sequential and multi-lap sequential.

``e2e`` is the parallel regime with one module holding every block: one head, ordinary backprop.
``parallel`` passes each message through every worker in turn, which is what the pipeline does
with FIFO buffers, one worker per rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from trgl_pipe.live import Publisher
from trgl_pipe.messages import Kind, Message
from trgl_pipe.schedule import eval_due, eval_messages, parallel_stream, total_steps
from trgl_pipe.worker import StageWorker


def drive(
    stream: Iterable[Message], workers: Sequence[StageWorker], publishers: Sequence[Publisher] = ()
) -> None:
    """Pass every message through ``workers`` in order (the synchronous pipeline)."""
    for msg in stream:
        for i, worker in enumerate(workers):
            msg = worker.handle(msg)
            if publishers and msg.kind is Kind.TRAIN and publishers[i].due():
                publishers[i].publish(worker.live_snapshot())


def run_parallel(
    ctx, workers: Sequence[StageWorker], publishers: Sequence[Publisher] = (), start=None
) -> None:
    """Parallel (and e2e) regime in one process."""
    from trgl_pipe.schedule import Position

    drive(parallel_stream(ctx.cfg, ctx.batches, start or Position()), workers, publishers)


def run_sequential(ctx, workers: Sequence[StageWorker], publishers: Sequence[Publisher] = ()) -> None:
    """Sequential (laps=1) and multi-lap sequential training.

    In each lap, module k trains for epochs/laps epochs on the output of modules 0..k-1, which
    run frozen (eval mode, no graph, so their BatchNorm statistics do not move). Module k's
    epoch e sees the same batches as epoch e of the parallel regime.
    """
    cfg = ctx.cfg
    laps = cfg.train.laps
    per_lap = cfg.train.epochs // laps
    limit = total_steps(cfg, ctx.batches.steps_per_epoch)
    last_epoch = cfg.train.epochs - 1
    for lap in range(laps):
        for k, worker in enumerate(workers):
            frozen = [w.stage for w in workers[:k]]
            for e in range(per_lap):
                epoch = lap * per_lap + e
                for b, (x, y) in enumerate(ctx.batches.train_batches(epoch)):
                    if worker.stage.num_steps >= limit:
                        break
                    for stage in frozen:
                        x = stage.forward_frozen(x)
                    step = worker.stage.num_steps
                    worker.handle(Message(Kind.TRAIN, x, y, epoch=epoch, batch=b, step=step))
                    if publishers and publishers[k].due():
                        publishers[k].publish(worker.live_snapshot())
                worker.handle(Message(Kind.EPOCH_END, epoch=epoch))
                # the last epoch of the last lap always evaluates, so the last module's last
                # epoch ends with every head evaluated on the final network
                if eval_due(cfg, epoch, last_epoch):
                    final = lap == laps - 1 and k == len(workers) - 1
                    drive(eval_messages(ctx.batches, epoch, final=final), workers[: k + 1])
    for worker in workers:
        worker.handle(Message(Kind.STOP))


def run_regime(ctx, workers: Sequence[StageWorker], publishers: Sequence[Publisher] = ()) -> None:
    for worker in workers:
        worker.clock.restart()
    if ctx.cfg.train.regime in ("sequential", "multilap"):
        run_sequential(ctx, workers, publishers)
    else:
        run_parallel(ctx, workers, publishers)
