"""SIGTERM (Slurm preemption, scancel, torchrun stopping a job) asks training to stop cleanly.

Unless a rank has already recorded a failure on the store: then no consistent checkpoint can be
cut, SIGTERM is torchrun stopping a failed group, and the process exits at once with status 1.

The handler only sets a flag. The data stream checks it before every training and evaluation
batch and ends the stream with a checkpoint at the current position followed by a STOP marked
"preempted", so every module saves the same cut and every rank learns the decision from the
stream it receives: all exit with 143 or none does. ``resume=auto`` continues from there.
In the pipeline a rank that gets SIGTERM alone tells the first stage through the store; the
replicas of the first stage agree on the batch to stop at with a non-blocking all-reduce read
one batch later, since their streams must stay in step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a job stopped by SIGTERM

_requested = threading.Event()
_job_failed: Callable[[], bool] | None = None
_before_failed_exit: list[Callable[[], None]] = []
FAILED_EXIT_CODE = 1


def _on_sigterm(signum: int, frame: Any) -> None:
    _requested.set()
    if _job_failed is not None and _job_failed():
        # a rank already recorded why the job failed, so no consistent checkpoint can be cut:
        # torchrun is stopping the group, and a rank stuck in Python (a long wait, a sleep) would
        # otherwise hold it for torchrun's fixed 30 s grace before being killed
        for cleanup in _before_failed_exit:
            with contextlib.suppress(Exception):
                cleanup()
        os._exit(FAILED_EXIT_CODE)


def install(job_failed: Callable[[], bool] | None = None) -> None:
    """Route SIGTERM to the stop flag (call from the main thread). ``job_failed``: in the
    pipeline, whether a failure is on record; SIGTERM then ends the process at once."""
    global _job_failed
    _requested.clear()
    _job_failed = job_failed
    _before_failed_exit.clear()
    signal.signal(signal.SIGTERM, _on_sigterm)


def before_failed_exit(cleanup: Callable[[], None]) -> None:
    """Call ``cleanup`` (idempotent, quick) before SIGTERM ends a failed job's process at once:
    rank 0 drops its run folder's lock there, and the folder if nothing was written to it, as it
    does on its own failure path, which that SIGTERM may cut short."""
    _before_failed_exit.append(cleanup)


def requested() -> bool:
    return _requested.is_set()


def shared_flag(store: Any, rank: int, every_s: float = 0.5) -> Callable[[], bool]:
    """A stop check for pipeline ranks: this process's flag, or any rank's flag on the store."""
    state = {"next": 0.0, "seen": False, "told": False}

    def check() -> bool:
        if _requested.is_set() and not state["told"]:
            state["told"] = True
            store.set("preempt", str(rank))
        now = time.monotonic()
        if not state["seen"] and now >= state["next"]:
            state["next"] = now + every_s
            state["seen"] = store.check(["preempt"])
        return _requested.is_set() or state["seen"]

    return check


class Agreed:
    """``check`` made collective over ``group``: true on every member from the same call on.

    Every member must call it at the same points of its stream (the first stage's replicas do).
    Each call starts a non-blocking all-reduce of this member's flag and answers with the result
    of the previous call's, which has had a whole batch to complete: the stream never blocks on a
    collective per batch, and every member still stops at the same batch (one batch later than a
    blocking agreement would). ``drain`` waits for the last one before the group is destroyed (a
    group destroyed under a running all-reduce aborts the process).
    """

    def __init__(self, check: Callable[[], bool], group: Any, timeout_s: float = 900.0) -> None:
        from datetime import timedelta

        self._check, self._group = check, group
        self._timeout = timedelta(seconds=timeout_s)
        self._pending: list[tuple[Any, Any]] = []

    def __call__(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self._check() else 0], dtype=torch.int64)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending.append((work, flag))
        if len(self._pending) < 2:
            return False
        previous, previous_flag = self._pending.pop(0)
        previous.wait(self._timeout)
        return bool(previous_flag.item())

    def drain(self) -> None:
        while self._pending:
            work, _ = self._pending.pop(0)
            work.wait(self._timeout)


def agreed(check: Callable[[], bool], group: Any, timeout_s: float = 900.0) -> Agreed:
    """``check`` agreed over ``group`` (see :class:`Agreed`)."""
    return Agreed(check, group, timeout_s)
