"""Data parallelism of one stage: R replicas, each training on its shard of every batch.

Applied to a built :class:`~trgl_pipe.stage.Stage` from outside (the stage knows nothing of it):
- gradients of T_k and F_k are averaged over the replicas by torch's DistributedDataParallel on
  the mesh's "dp" group, every step;
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

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from trgl_pipe.stage import Stage


def sync_batchnorm(module: nn.Module, group: Any) -> nn.Module:
    """BatchNorm layers of ``module`` as SyncBatchNorm over ``group`` (before building the optimizer)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=group)


def replicate(stage: Stage, group: Any) -> None:
    """Make ``stage`` one of the data-parallel replicas of ``group``."""
    size = dist.get_world_size(group)
    if size == 1:
        return
    device_ids = [stage.device] if stage.device.type == "cuda" else None
    stage.use_replica_stream(dist.get_rank(group))
    # DDP's default: replica 0's buffers (BatchNorm running statistics) go to the others before
    # each training forward
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
