from __future__ import annotations

import torch

from trgl_pipe.config import load_config
from trgl_pipe.data import Batches, load_data
from trgl_pipe.runtime.messages import Kind
from trgl_pipe.runtime.schedule import Position, parallel_stream


def _stream(*overrides: str, start: Position | None = None, stop=None):
    cfg = load_config(
        None,
        [
            "data.source=embedded",
            "data.train_size=300",
            "data.val_size=100",
            "data.test_size=200",
            "data.batch_size=64",
            "data.eval_batch_size=100",
            *overrides,
        ],
    )
    batches = Batches(load_data(cfg.data, cfg.seed), cfg.data, cfg.seed)
    return list(parallel_stream(cfg, batches, start, stop or (lambda: False)))


def _kinds(stream) -> str:
    codes = {
        Kind.TRAIN: "T",
        Kind.EVAL: "e",
        Kind.EVAL_DONE: "D",
        Kind.EPOCH_END: "|",
        Kind.CHECKPOINT: "C",
        Kind.STOP: "S",
    }
    return "".join(codes[m.kind] for m in stream)


def test_stream_of_two_epochs() -> None:
    stream = _stream("train.epochs=2", "train.eval_every_epochs=1", "checkpoint.every_epochs=1")
    # 5 batches (the last of 44), then 1 val + 2 test eval batches, epoch end, checkpoint
    assert _kinds(stream) == "TTTTTeeeD|C" + "TTTTTeeeD|C" + "S"
    assert [m.num_samples for m in stream[:5]] == [64, 64, 64, 64, 44]
    assert [m.step for m in stream if m.kind is Kind.TRAIN] == list(range(10))
    assert stream[-2].final and stream[-2].epoch == 2 and stream[-2].step == 10


def test_evaluation_only_at_the_end_and_mid_epoch_checkpoints() -> None:
    stream = _stream(
        "train.epochs=2", "train.eval_every_epochs=0", "checkpoint.every_epochs=0", "checkpoint.every_steps=3"
    )
    assert _kinds(stream) == "TTTCTT|" + "TCTTTCT" + "eeeD|CS"
    mid = [m for m in stream if m.kind is Kind.CHECKPOINT and not m.final]
    assert [(m.epoch, m.batch, m.step) for m in mid] == [(0, 3, 3), (1, 1, 6), (1, 4, 9)]


def test_resuming_mid_epoch_replays_the_same_batches() -> None:
    full = _stream("train.epochs=2")
    resumed = _stream("train.epochs=2", start=Position(epoch=1, batch=2, step=7))
    tail = [m for m in full if m.kind is Kind.TRAIN][7:]
    again = [m for m in resumed if m.kind is Kind.TRAIN]
    assert len(again) == len(tail) == 3
    assert all(torch.equal(a.x, b.x) and a.step == b.step for a, b in zip(tail, again, strict=True))


def test_max_steps_ends_early_with_evaluation() -> None:
    stream = _stream(
        "train.epochs=5", "train.max_steps=7", "checkpoint.every_epochs=0", "train.eval_every_epochs=0"
    )
    assert _kinds(stream) == "TTTTT|TTeeeD|CS"


def _stop_after(n: int):
    """A stop check that turns true at its n-th call (0-based); it is asked before every batch."""
    calls = iter(range(1000))
    return lambda: next(calls) >= n


def test_stop_request_checkpoints_the_current_position() -> None:
    # 5 train batches and 3 eval batches per epoch: call 9 is before epoch 1's second batch
    stream = _stream("train.epochs=2", stop=_stop_after(9))
    assert _kinds(stream) == "TTTTTeeeD|C" + "TCS"
    ckpt, stop = stream[-2], stream[-1]
    assert (ckpt.epoch, ckpt.batch, ckpt.step, ckpt.final) == (1, 1, 6, False)
    assert stop.preempted and not any(m.preempted for m in stream[:-1])


def test_a_stop_during_evaluation_does_not_wait_for_all_of_it() -> None:
    stream = _stream("train.epochs=2", "checkpoint.every_epochs=0", stop=_stop_after(6))  # 2nd eval batch
    assert _kinds(stream) == "TTTTTe" + "CS"
    ckpt = stream[-2]
    # "after epoch 0's training batches": resuming repeats that evaluation, then goes on
    assert (ckpt.epoch, ckpt.batch, ckpt.step) == (0, 5, 5)
    resumed = _stream("train.epochs=2", "checkpoint.every_epochs=0", start=Position(0, 5, 5))
    assert _kinds(resumed) == "eeeD|" + "TTTTTeeeD|CS"


def test_no_second_checkpoint_at_the_position_of_the_last_one() -> None:
    # SIGTERM on the first batch after an epoch-end checkpoint: that checkpoint already holds the
    # position, so the stream stops without writing (and so without replacing) it
    stream = _stream("train.epochs=2", stop=_stop_after(8))
    assert _kinds(stream) == "TTTTTeeeD|C" + "S"
    assert stream[-1].preempted
    # the same when the run resumed from that checkpoint and is stopped before its first batch
    resumed = _stream("train.epochs=2", start=Position(1, 0, 5), stop=_stop_after(0))
    assert _kinds(resumed) == "S" and resumed[0].preempted
    # and after a mid-epoch checkpoint
    stream = _stream("train.epochs=2", "checkpoint.every_steps=3", stop=_stop_after(3))
    assert _kinds(stream) == "TTTCS"
