"""The data-parallel step done by hand in one process: the reference a pipeline with replicas is
compared with (tests/multiproc/test_layouts.py for TRGL, test_user_pipeline.py for a user's
objective). DDP keeps replica 0's BatchNorm running statistics, scales each replica's gradient by
1/R and sums them; these helpers do the same, in the same order of operations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def forward_shards(net: nn.Module, shards: list[Any], forward: Callable[[Any], Any]) -> list[Any]:
    """``forward(shard)`` for each replica's shard in turn; the shards after the first update copies
    of the BatchNorm buffers, so replica 0's running statistics are the ones that survive."""
    replica_0: dict[tuple[nn.Module, str], torch.Tensor] = {}
    results = []
    for r, shard in enumerate(shards):
        if r >= 1:
            for m in net.modules():
                for name, b in m._buffers.items():
                    if b is not None:
                        replica_0.setdefault((m, name), b)
                        m._buffers[name] = b.clone()
        results.append(forward(shard))
    for (m, name), b in replica_0.items():
        m._buffers[name] = b
    return results


def as_logged(values: tuple[torch.Tensor, ...], n: int) -> tuple[float, ...]:
    """Per-step values as a stage logs them: (value × n) in float32, to float64, / n."""
    return tuple(((t.detach() * n).double() / n).item() for t in values)


def averaged_step(stage: Any, grads: list[tuple[torch.Tensor, ...]]) -> None:
    """DDP's average of the replicas' gradients (each × 1/R, summed), then one optimizer and
    scheduler step of ``stage``."""
    replicas = len(grads)
    for p, *per_replica in zip(stage.parameters(), *grads, strict=True):
        total = per_replica[0] * (1.0 / replicas)
        for g in per_replica[1:]:
            total = total + g * (1.0 / replicas)
        p.grad = total
    stage.optimizer.step()
    stage.scheduler.step()
    stage.num_steps += 1
