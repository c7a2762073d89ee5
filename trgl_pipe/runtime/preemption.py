"""SIGTERM (Slurm preemption, scancel, torchrun stopping a job) asks training to stop cleanly.

The handler only sets a flag. The data stream checks it before every training and evaluation
batch and ends the stream with a checkpoint at the current position followed by a STOP marked
"preempted", so every module saves the same cut and every rank learns the decision from the
stream it receives: all exit with 143 or none does. ``resume=auto`` continues from there.
In the pipeline a rank that gets SIGTERM alone tells the first stage through the store; the
replicas of the first stage agree on the batch to stop at with an all-reduce, since their
streams must stay in step.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a job stopped by SIGTERM

_requested = threading.Event()


def _on_sigterm(signum: int, frame: Any) -> None:
    _requested.set()


def install() -> None:
    """Route SIGTERM to the stop flag (call from the main thread)."""
    _requested.clear()
    signal.signal(signal.SIGTERM, _on_sigterm)


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


def agreed(check: Callable[[], bool], group: Any) -> Callable[[], bool]:
    """``check`` made collective over ``group``: true on every member as soon as it is on one.

    Every member must call it at the same points of its stream (the first stage's replicas do).
    """
    import torch
    import torch.distributed as dist

    flag = torch.zeros(1, dtype=torch.int64)

    def collective() -> bool:
        flag.fill_(1 if check() else 0)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    return collective
