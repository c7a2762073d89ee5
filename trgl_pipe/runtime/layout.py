"""Which rank holds which modules: K modules, M per rank (a stage), R replicas per stage.

World size = (K / M) × R. Ranks are numbered stage-major, ``rank = stage * R + replica``: a
stage's replicas are neighbours, so with ``--nproc_per_node`` a multiple of R they share a node
(their gradient all-reduce stays on the node) and a node boundary cuts between stages, where only
activations cross. This is the ("pp", "dp") DeviceMesh with pp outermost. Replica r of stage s
sends only to replica r of stage s+1. Pure: no torch.distributed here.
"""

from __future__ import annotations

from dataclasses import dataclass

from trgl_pipe.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Layout:
    num_modules: int  # K
    modules_per_rank: int = 1  # M
    replicas: int = 1  # R

    def __post_init__(self) -> None:
        if self.num_modules % self.modules_per_rank:
            raise ConfigError(
                f"pipeline.modules_per_rank={self.modules_per_rank} does not divide "
                f"model.num_modules={self.num_modules}"
            )

    @property
    def num_stages(self) -> int:
        return self.num_modules // self.modules_per_rank

    @property
    def world_size(self) -> int:
        return self.num_stages * self.replicas

    @property
    def mesh_shape(self) -> tuple[int, int]:
        """(pp, dp): stages × replicas."""
        return (self.num_stages, self.replicas)

    def stage_of(self, rank: int) -> int:
        return rank // self.replicas

    def replica_of(self, rank: int) -> int:
        return rank % self.replicas

    def rank_of(self, stage: int, replica: int) -> int:
        return stage * self.replicas + replica

    def modules_of_stage(self, stage: int) -> list[int]:
        first = stage * self.modules_per_rank
        return list(range(first, first + self.modules_per_rank))

    def modules_of(self, rank: int) -> list[int]:
        return self.modules_of_stage(self.stage_of(rank))

    def previous_rank(self, rank: int) -> int | None:
        """The rank this one receives from (same replica, stage before), or None for stage 0."""
        stage = self.stage_of(rank)
        return None if stage == 0 else self.rank_of(stage - 1, self.replica_of(rank))

    def next_rank(self, rank: int) -> int | None:
        """The rank this one sends to (same replica, stage after), or None for the last stage."""
        stage = self.stage_of(rank)
        return None if stage == self.num_stages - 1 else self.rank_of(stage + 1, self.replica_of(rank))

    def describe(self) -> str:
        return (
            f"K={self.num_modules} modules, {self.modules_per_rank} per rank, {self.num_stages} stages × "
            f"{self.replicas} replicas = {self.world_size} ranks"
        )


def check_world_size(layout: Layout, world_size: int, nnodes: int = 1) -> None:
    """One line naming K, M, R and the world size, with a torchrun line that would fit."""
    if world_size == layout.world_size:
        return
    k, m, r = layout.num_modules, layout.modules_per_rank, layout.replicas
    need = layout.world_size
    per_node = (
        f"--nnodes={nnodes} --nproc_per_node={need // nnodes}" if need % nnodes == 0 and nnodes > 1 else ""
    )
    launch = per_node or f"--nproc_per_node={need}"
    fits = [
        (mm, rr)
        for mm in range(1, k + 1)
        if k % mm == 0
        for rr in range(1, world_size + 1)
        if (k // mm) * rr == world_size
    ]
    if fits:
        mm, rr = min(fits, key=lambda f: (abs(f[0] - m) + abs(f[1] - r), f))
    options = [f"start torchrun {launch} ..."]
    if fits:
        options.append(f"set pipeline.modules_per_rank={mm} pipeline.replicas={rr}")
    if m == 1 and r == 1 and 1 < world_size <= k:
        options.append(f"set model.num_modules={world_size}")
    raise ConfigError(
        f"torchrun started {world_size} ranks but model.num_modules={k} with pipeline.modules_per_rank={m} "
        f"and pipeline.replicas={r} needs (K/M)×R = ({k}/{m})×{r} = {need} ranks; " + ", or ".join(options)
    )


def slot_samples(batch: int, eval_batch: int, replicas: int = 1) -> int:
    """The samples one receive slot (and one host staging buffer) is allocated for: the largest
    message a rank receives, a replica's shard of a training or an evaluation batch.

    Slots are allocated once, for any message; with the default ``data.eval_batch_size`` (four
    times the training batch) they are four times the training batch. The run, ``trgl_pipe.plan``
    and benchmarks/memory.py all size them with this function, so their memory figures agree.
    """
    return -(-max(batch, eval_batch) // replicas)
