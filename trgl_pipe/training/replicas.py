"""Data parallelism of one stage: R replicas, each training on its shard of every batch.

Applied to a built :class:`~trgl_pipe.stage.Stage` from outside (the stage knows nothing of it):
- gradients of T_k and F_k are averaged over the replicas by torch's DistributedDataParallel on
  the mesh's "dp" group, every step; the delayed-gradient regimes (ddg, fr), whose backward runs
  steps after its forward on a stored graph, call :func:`average_gradients` instead;
- BatchNorm: each replica normalises with its own shard's statistics (DDP's behaviour); DDP
  copies replica 0's running statistics to the others before each training forward, and
  :func:`replicate` does the same before an evaluation, so every replica evaluates the same
  model. ``pipeline.sync_batchnorm=true`` converts the layers to SyncBatchNorm instead (batch
  statistics over the whole batch; CUDA only, a torch restriction);
- the adaptive λ is updated from the CE averaged over the replicas (identical on all of them);
- evaluation counts (correct, CE, samples, kinetic energy) are summed over the replicas: the
  accuracy is exact, not a mean of means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from trgl_pipe.stage import Stage


def sync_batchnorm(module: nn.Module, group: Any) -> nn.Module:
    """BatchNorm layers of ``module`` as SyncBatchNorm over ``group`` (before building the optimizer)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=group)


def replicate(stage: Stage, group: Any, ddp: bool = True) -> None:
    """Make ``stage`` one of the data-parallel replicas of ``group``.

    ``ddp=False`` (ddg, fr) leaves ``stage.net`` alone: the caller averages the gradients
    (:func:`average_gradients`) and calls ``stage.sync_buffers`` before each training forward.
    """
    size = dist.get_world_size(group)
    if size == 1:
        return
    device_ids = [stage.device] if stage.device.type == "cuda" else None
    stage.use_replica_stream(dist.get_rank(group))
    if ddp:
        # DDP's default: replica 0's buffers (BatchNorm running statistics) go to the others
        # before each training forward
        stage.net = DistributedDataParallel(stage.local_net, device_ids=device_ids, process_group=group)
    first = dist.get_global_rank(group, 0)

    def reduce_sum(t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    def average(t: Tensor) -> Tensor:
        return reduce_sum(t) / size

    def sync_buffers() -> None:
        with torch.no_grad():
            for buffer in stage.local_net.buffers():
                dist.broadcast(buffer, src=first, group=group)

    stage.reduce_sum = reduce_sum
    stage.sync_buffers = sync_buffers
    stage.objective.average = average


def average_gradients(params: Sequence[Tensor], group: Any) -> None:
    """Replace each parameter's gradient by its mean over the replicas of ``group``, in place.

    For the delayed-gradient regimes: DDP averages inside the backward of a forward it ran, but
    a delayed backward runs steps later on a stored graph (DDG: built on a copy of the weights),
    where DDP's hooks do not see it. So, as DDP computes it: every gradient in one flat buffer
    per dtype (parameters in their fixed order, those without a gradient left out, the same on
    every replica), divided by R, then one all-reduce SUM. The result is the same on every
    replica and from run to run (the backend adds in a fixed order); with two replicas the order
    cannot matter and dividing by 2 is exact, so it is the one-process mean bit for bit.
    """
    size = dist.get_world_size(group)
    if size == 1:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat.div_(size)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def gather_to_first(obj: Any, group: Any) -> list[Any]:
    """Every replica's ``obj`` on replica 0 (in replica order); the others get ``[obj]``.

    For state only replica 0 writes but each replica holds its own (a delayed regime's batches
    in flight: each replica's are its shards).
    """
    first = dist.get_global_rank(group, 0)
    mine = dist.get_rank(group) == 0
    gathered: list[Any] | None = [None] * dist.get_world_size(group) if mine else None
    dist.gather_object(obj, gathered, dst=first, group=group)
    return gathered if gathered is not None else [obj]
