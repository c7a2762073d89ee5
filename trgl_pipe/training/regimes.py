"""The single-process regimes: end-to-end, parallel, sequential and multi-lap sequential.

``e2e`` is the parallel regime with one module holding every block: one head, ordinary backprop.
``parallel`` passes each message through every worker in turn, which is what the pipeline does
with FIFO buffers, one worker per rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from trgl_pipe.context import RunContext
from trgl_pipe.folder.checkpoint import CheckpointWriter, Progress
from trgl_pipe.runtime.messages import Kind, Message
from trgl_pipe.runtime.schedule import Position, eval_due, eval_messages, parallel_stream, total_steps
from trgl_pipe.training.from_next import link_workers
from trgl_pipe.training.worker import StageWorker
from trgl_pipe.watch.live import Publisher


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
    ctx: RunContext,
    workers: Sequence[StageWorker],
    publishers: Sequence[Publisher] = (),
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Parallel (and e2e) regime in one process."""
    start = Position(progress.epoch, progress.batch, progress.step) if progress else Position()
    link_workers(workers)
    drive(parallel_stream(ctx.cfg, ctx.batches, start, should_stop), workers, publishers)


def sequential_phases(epochs: int, laps: int, num_modules: int) -> list[tuple[int, int, int]]:
    """(lap, module, epoch) in training order: each lap trains modules 0..K-1 for epochs/laps each.

    ``epoch`` counts the module's own epochs over all laps, so module k's epoch e sees the same
    batches as epoch e of the parallel regime.
    """
    per_lap = epochs // laps
    return [
        (lap, k, lap * per_lap + e) for lap in range(laps) for k in range(num_modules) for e in range(per_lap)
    ]


def run_sequential(
    ctx: RunContext,
    workers: Sequence[StageWorker],
    publishers: Sequence[Publisher] = (),
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    writer: CheckpointWriter | None = None,
) -> None:
    """Sequential (laps=1) and multi-lap sequential training.

    Module k trains on the output of modules 0..k-1, which run frozen (eval mode, no graph, so
    their BatchNorm statistics do not move). Checkpoints come after module-epochs (and on SIGTERM).
    """
    cfg = ctx.cfg
    spe = ctx.batches.steps_per_epoch
    limit = total_steps(cfg, spe)
    last_epoch = cfg.train.epochs - 1
    phases = sequential_phases(cfg.train.epochs, cfg.train.laps, len(workers))
    first_phase = progress.phase if progress else 0
    every = cfg.checkpoint.every_epochs

    def checkpoint(phase: int, batch: int, final: bool = False) -> None:
        if writer is not None:
            for w in workers:
                w.stage.check_finite()
            writer.write(
                Progress(counter=phase * spe + batch, phase=phase, batch=batch, final=final), list(workers)
            )

    for p in range(first_phase, len(phases)):
        _, k, epoch = phases[p]
        worker = workers[k]
        frozen = [w.stage for w in workers[:k]]
        first = progress.batch if (progress and p == first_phase) else 0
        for b, (x, y) in enumerate(ctx.batches.train_batches(epoch, first), start=first):
            if worker.stage.num_steps >= limit:
                break
            if should_stop():
                checkpoint(p, b)
                return
            image = x if worker.reads_image else None
            for stage in frozen:
                x = stage.forward_frozen(x)
            step = worker.stage.num_steps
            worker.handle(Message(Kind.TRAIN, x, y, epoch=epoch, batch=b, step=step, image=image))
            if publishers and publishers[k].due():
                publishers[k].publish(worker.live_snapshot())
        worker.handle(Message(Kind.EPOCH_END, epoch=epoch))
        if eval_due(cfg, epoch, last_epoch):  # the last phase always evaluates every head
            drive(eval_messages(ctx.batches, epoch, final=p == len(phases) - 1), workers[: k + 1])
        if p == len(phases) - 1:
            checkpoint(p + 1, 0, final=True)
        elif every and (p + 1) % every == 0:
            checkpoint(p + 1, 0)
    for worker in workers:
        worker.handle(Message(Kind.STOP))


def run_regime(
    ctx: RunContext,
    workers: Sequence[StageWorker],
    publishers: Sequence[Publisher] = (),
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    writer: CheckpointWriter | None = None,
) -> None:
    for worker in workers:
        worker.restart_clock()
    if ctx.cfg.train.regime in ("sequential", "multilap"):
        run_sequential(ctx, workers, publishers, progress, should_stop, writer)
    elif ctx.cfg.train.regime in ("ddg", "fr"):
        from trgl_pipe.training.delayed import run_delayed

        run_delayed(ctx, workers, progress, should_stop)
    else:
        run_parallel(ctx, workers, publishers, progress, should_stop)
