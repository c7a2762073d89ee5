"""The stream of messages that drives training: batches, evaluations, markers, in order.

Only the first module's worker (rank 0 in the pipeline) reads data; the stream is the same for
the single-process parallel regime and the pipeline, which is what makes them equivalent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from trgl_pipe.config import Config
from trgl_pipe.data import Batches
from trgl_pipe.runtime.messages import SPLITS, Kind, Message


@dataclass(frozen=True, slots=True)
class Position:
    """Where training resumes: the next batch to train is batch ``batch`` of ``epoch``."""

    epoch: int = 0
    batch: int = 0
    step: int = 0  # training steps done so far


def eval_due(cfg: Config, epoch: int, last_epoch: int) -> bool:
    """Evaluate after ``epoch`` (0-based)? Always after the last one."""
    every = cfg.train.eval_every_epochs
    return epoch == last_epoch or (every > 0 and (epoch + 1) % every == 0)


def eval_messages(
    batches: Batches, epoch: int, final: bool, should_stop: Callable[[], bool] | None = None
) -> Iterator[Message | None]:
    """Every validation then test batch, then EVAL_DONE. With ``should_stop``, a None in place of
    the next batch means "stop now" (a SIGTERM during evaluation does not wait for all of it)."""
    for split_index, split in enumerate(SPLITS):
        for x, y in batches.eval_batches(split):
            if should_stop is not None and should_stop():
                yield None
                return
            yield Message(Kind.EVAL, x, y, epoch=epoch, split=split_index)
    yield Message(Kind.EVAL_DONE, epoch=epoch, final=final)


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Optimizer steps each module takes over the whole run (sets the LR schedule's length)."""
    steps = cfg.train.epochs * steps_per_epoch
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def _never() -> bool:
    return False


def parallel_stream(
    cfg: Config, batches: Batches, start: Position | None = None, should_stop: Callable[[], bool] = _never
) -> Iterator[Message]:
    """Messages of the parallel regime from ``start`` to the end of training.

    ``should_stop()`` is asked before every training and evaluation batch. When it turns true
    (SIGTERM), the stream ends with a checkpoint of the current position, unless the last
    checkpoint (or the one this run resumed from) is already there, and a STOP that says the run
    was preempted, so every module and every rank learns the same decision from the stream. A
    stop during an evaluation checkpoints "after the epoch's training batches": resuming from it
    repeats that evaluation, then goes on.
    """
    start = start or Position()
    epochs = cfg.train.epochs
    spe = batches.steps_per_epoch
    limit = total_steps(cfg, spe)
    step = start.step
    every_steps = cfg.checkpoint.every_steps
    every_epochs = cfg.checkpoint.every_epochs
    saved = (start.epoch, start.batch, start.step)  # the position the last checkpoint holds

    def stop_here(epoch: int, batch: int) -> Iterator[Message]:
        if (epoch, batch, step) != saved:
            yield Message(Kind.CHECKPOINT, epoch=epoch, batch=batch, step=step)
        yield Message(Kind.STOP, preempted=True)

    for epoch in range(start.epoch, epochs):
        first = start.batch if epoch == start.epoch else 0
        for b, (x, y) in enumerate(batches.train_batches(epoch, first), start=first):
            if step >= limit:
                break
            if should_stop():
                yield from stop_here(epoch, b)
                return
            yield Message(Kind.TRAIN, x, y, epoch=epoch, batch=b, step=step)
            step += 1
            last_in_epoch = b + 1 == spe
            if every_steps and step % every_steps == 0 and not last_in_epoch and step < limit:
                yield Message(Kind.CHECKPOINT, epoch=epoch, batch=b + 1, step=step)
                saved = (epoch, b + 1, step)
        done = step >= limit
        last = epochs - 1 if not done else epoch
        if eval_due(cfg, epoch, last):
            for msg in eval_messages(batches, epoch, final=epoch == last, should_stop=should_stop):
                if msg is None:
                    yield from stop_here(epoch, spe)
                    return
                yield msg
        yield Message(Kind.EPOCH_END, epoch=epoch)
        if epoch == last:
            yield Message(Kind.CHECKPOINT, epoch=epoch + 1, batch=0, step=step, final=True)
            break
        if every_epochs and (epoch + 1) % every_epochs == 0:
            yield Message(Kind.CHECKPOINT, epoch=epoch + 1, batch=0, step=step)
            saved = (epoch + 1, 0, step)
    yield Message(Kind.STOP)
