"""The first stage's replicas agree on where to stop without a blocking collective per batch."""

from __future__ import annotations

import pytest
from conftest import run_ranks

pytestmark = pytest.mark.multiproc

SCRIPT = """
import os
from datetime import timedelta
import torch.distributed as dist
from trgl_pipe.runtime.preemption import agreed
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=timedelta(seconds=15))
calls = {"n": 0}
def check():  # rank 1 is told to stop at its third check
    calls["n"] += 1
    return rank == 1 and calls["n"] >= 3
stop = agreed(check, dist.group.WORLD, timeout_s=15)
print("answers", *[int(stop()) for _ in range(6)], flush=True)
stop.drain()  # the last all-reduce ends before the process does
dist.barrier()
os._exit(0)  # as the runtime leaves: no teardown of a group the other rank may still close
"""


def test_every_replica_stops_at_the_same_check_one_batch_after_the_signal() -> None:
    outputs = run_ranks(SCRIPT, 2, [])
    answers = [o.split()[-6:] for o in outputs]
    assert answers == [["0", "0", "0", "1", "1", "1"]] * 2
