"""Evaluation across data-parallel replicas: every layout × split size × batch size evaluates each
sample exactly once, never crashes on an empty shard, and every replica makes the same collective.

The replicas run in threads of this process; their ``reduce_sum`` is an all-reduce built on a
barrier, which breaks (and fails the test) if one replica reduces a different number of times or
a tensor of another shape than its peers. Between ranks the messages go through the header
encoding the torch.distributed link uses.
"""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch
from conftest import TINY

from trgl_pipe.config import load_config
from trgl_pipe.context import build_context
from trgl_pipe.data import Batches
from trgl_pipe.runtime.layout import Layout
from trgl_pipe.runtime.messages import SPLITS, Kind
from trgl_pipe.runtime.schedule import eval_messages
from trgl_pipe.runtime.transport import _decode_header, _encode_header
from trgl_pipe.training.worker import StageWorker

LAYOUTS = [(2, 1, 2), (2, 1, 3), (4, 2, 2), (3, 1, 4), (2, 2, 1)]  # (K, modules per rank, R)
SPLIT_SIZES = [(1, 0), (0, 3), (2, 5), (7, 1)]  # (val, test)
EVAL_BATCH_SIZES = [1, 2, 5, 100]


class BarrierReduce:
    """A sum over ``parties`` threads; records the shape each one reduced, in order."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=10)
        self.slots: list[torch.Tensor | None] = [None] * parties
        self.shapes: list[list[tuple[int, ...]]] = [[] for _ in range(parties)]

    def for_replica(self, r: int):
        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            self.shapes[r].append(tuple(t.shape))
            self.slots[r] = t
            self.barrier.wait()
            total = torch.stack(self.slots).sum(0)  # fails if the shapes differ
            self.barrier.wait()
            return total

        return reduce_sum


class _NullLogger:
    def log(self, *args, **kwargs) -> None:
        pass


def _evaluate_replica(chain, layout: Layout, batches: Batches, max_batch: int, results: list, r: int) -> None:
    workers = [StageWorker(stage, _NullLogger(), 1) for stage in chain]
    for msg in eval_messages(batches, epoch=0, final=True):
        for k, worker in enumerate(workers):
            if k and k % layout.modules_per_rank == 0:  # a rank boundary: header + activation
                x = msg.x
                msg = _decode_header(_encode_header(msg, max_batch))
                msg.x = x if msg.kind.has_payload else None
            msg = worker.handle(msg)
    results[r] = [w.last_eval for w in workers]


@pytest.fixture(scope="module")
def contexts():
    built = {}
    for k in sorted({k for k, _, _ in LAYOUTS}):
        cfg = load_config(None, [*TINY, f"model.num_modules={k}"])
        ctx = build_context(cfg, torch.device("cpu"))
        stages = [ctx.build_stage(i) for i in range(k)]
        built[k] = (cfg, ctx, stages)
    return built


@pytest.mark.parametrize(("k", "per_rank", "replicas"), LAYOUTS)
def test_every_sample_is_evaluated_once_whatever_the_shards(contexts, k, per_rank, replicas) -> None:
    cfg, ctx, stages = contexts[k]
    layout = Layout(k, per_rank, replicas)
    for val_size, test_size in SPLIT_SIZES:
        data = dataclasses.replace(
            ctx.data,
            val=ctx.data.val.subset(torch.arange(val_size)),
            test=ctx.data.test.subset(torch.arange(test_size)),
        )
        for eval_batch in EVAL_BATCH_SIZES:
            data_cfg = dataclasses.replace(cfg.data, eval_batch_size=eval_batch)
            reduce = BarrierReduce(replicas)
            results: list = [None] * replicas
            threads = []
            for r in range(replicas):
                chain = [copy.deepcopy(s) for s in stages]
                for stage in chain:
                    stage.reduce_sum = reduce.for_replica(r)
                batches = Batches(data, data_cfg, cfg.seed, shard=(r, replicas))
                threads.append(
                    threading.Thread(
                        target=_evaluate_replica,
                        args=(chain, layout, batches, max(eval_batch, cfg.data.batch_size), results, r),
                    )
                )
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            case = f"K={k} M={per_rank} R={replicas} val={val_size} test={test_size} batch={eval_batch}"
            assert all(r is not None for r in results), f"a replica crashed: {case}"
            # one reduction of one shape per module and evaluation, on every replica
            assert len({tuple(s) for s in reduce.shapes}) == 1 and len(reduce.shapes[0]) == k, case
            expected = {"val": val_size, "test": test_size}
            for module in range(k):
                per_replica = [results[r][module] for r in range(replicas)]
                assert all(p == per_replica[0] for p in per_replica), case
                counts = {split: v["count"] for split, v in per_replica[0].items()}
                assert counts == {s: n for s, n in expected.items() if n}, case
                assert set(counts) <= set(SPLITS)


def test_an_empty_shard_travels_with_zero_labels() -> None:
    from trgl_pipe.runtime.messages import Message

    msg = Message(Kind.EVAL, torch.empty(0, 4), torch.empty(0, dtype=torch.int64), split=1)
    decoded = _decode_header(_encode_header(msg, 8))
    assert decoded.kind is Kind.EVAL and decoded.y is not None and decoded.y.shape == (0,)
    assert decoded.split == 1 and decoded.num_samples == 0
