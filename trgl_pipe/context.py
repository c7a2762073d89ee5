"""Everything a run builds before training, shared by single-process runs and pipeline ranks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from trgl_pipe.config import Config
from trgl_pipe.cost import aux_head_factory, measure_costs
from trgl_pipe.data import Batches, DataSplits, load_data
from trgl_pipe.errors import ConfigError
from trgl_pipe.models import Backbone
from trgl_pipe.partition import Partition, split_at, split_balanced, split_by_depth
from trgl_pipe.runtime.schedule import total_steps
from trgl_pipe.stage import Stage, build_parts, build_stage


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto``: the GPU of this local rank when there is one, else the CPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA GPU here; use device=cpu or device=auto")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def configure_torch(cfg: Config, ranks_on_host: int = 1) -> None:
    """Threads, determinism and torch's global generator, before any tensor work.

    Nothing trgl_pipe trains draws from the global generator (the network, the heads, the data
    order and every module's dropout have generators seeded from ``seed``), but torch seeds it
    from the operating system in every process, and checkpoints record it: seeded here, it is the
    same in every run and on every rank, so a resumed run's checkpoints hold what an uninterrupted
    run's hold, and user code that draws from it is reproducible.
    """
    torch.manual_seed(cfg.seed)
    threads = cfg.train.num_threads or max(1, (os.cpu_count() or 1) // ranks_on_host)
    torch.set_num_threads(threads)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def resolve_partition(
    cfg: Config, parts: Backbone, batches: Batches, num_classes: int, device: torch.device
) -> Partition:
    """The K block ranges of the run: all blocks in one module for e2e."""
    n = parts.num_blocks
    k = cfg.model.num_modules
    if cfg.train.regime == "e2e":
        return [(0, n)]
    if cfg.model.is_user and k > n:
        raise ConfigError(
            f"model.num_modules={k} is larger than the {n} blocks of model.arch={cfg.model.arch}; "
            f"use at most {n} modules"
        )
    split = cfg.model.split
    if isinstance(split, list):
        return split_at(n, split)
    if split == "depth":
        return split_by_depth(n, k)
    if split == "preset":
        if k not in parts.presets:
            known = ", ".join(f"K={key}: {value}" for key, value in parts.presets.items()) or "none"
            raise ConfigError(
                f"model.split=preset: {cfg.model.name} has no preset split for K={k} (presets: {known}); "
                "use model.split=depth, balanced or explicit block indices"
            )
        sizes = parts.presets[k]
        return split_at(n, [sum(sizes[:i]) for i in range(1, k)])
    heads = aux_head_factory(parts, num_classes, cfg)
    block_costs, end_costs = measure_costs(
        parts,
        batches.input_shape,
        cfg.data.batch_size,
        num_classes,
        heads,
        cfg.model.balance_by,
        device,
    )
    return split_balanced(block_costs, cfg.model.num_modules, end_costs)


@dataclass
class RunContext:
    """The pieces every regime and every pipeline rank start from.

    ``data`` and ``batches`` exist only where data is read: in one process, or on rank 0.
    """

    cfg: Config
    device: torch.device
    parts: Backbone
    partition: Partition
    num_classes: int
    input_shape: tuple[int, int, int]
    steps_per_epoch: int
    start_time: float
    data: DataSplits | None = None
    batches: Batches | None = None
    resume_from: str | None = None  # the checkpoint folder to continue from
    normalization: dict | None = None  # per-channel mean and std of the training images, in [0, 1]
    _split_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def num_modules(self) -> int:
        return len(self.partition)

    @property
    def total_steps(self) -> int:
        return total_steps(self.cfg, self.steps_per_epoch)

    def build_stage(self, index: int, transform: Callable[[nn.Module], nn.Module] | None = None) -> Stage:
        """Stage ``index``; ``transform`` rewrites its body and head before the optimizer is built."""
        return build_stage(
            self.cfg,
            self.parts,
            self.partition,
            index,
            self.num_classes,
            self.total_steps,
            self.steps_per_epoch,
            self.device,
            transform,
            self.normalization,
        )

    def shape_info(self) -> dict:
        """What ranks without data need to build their module (sent by rank 0)."""
        return {
            "partition": [list(r) for r in self.partition],
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "steps_per_epoch": self.steps_per_epoch,
            "normalization": self.normalization,
            "split_sizes": self.split_sizes,
            "fingerprint": self.parts.fingerprint(),
        }

    def check_same_network(self, info: dict, rank: int) -> None:
        """Refuse to train when this rank built another network than rank 0 (block shapes and
        parameter counts differ): the modules would not fit together."""
        mine, theirs = self.parts.fingerprint(), info.get("fingerprint")
        if theirs is not None and mine != theirs:
            raise ConfigError(
                f"rank {rank} built another network than rank 0 from model.arch={self.cfg.model.arch} "
                f"(fingerprint {mine} vs {theirs}: block shapes or parameter counts differ); make the "
                "builder give the same network on every rank (same code and arch_kwargs)"
            )

    @property
    def split_sizes(self) -> dict[str, int]:
        """Images in train / val / test (what a rank needs to know every batch size it will see)."""
        if self.data is None:
            return dict(self._split_sizes)
        return {"train": len(self.data.train), "val": len(self.data.val), "test": len(self.data.test)}

    def model_info(self) -> dict:
        """What an exported model needs besides weights (stored in checkpoint meta.json)."""
        return {
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "normalization": self.normalization,
        }


def build_context(
    cfg: Config,
    device: torch.device,
    data: DataSplits | None = None,
    shard: tuple[int, int] = (0, 1),
    partition: Partition | None = None,
) -> RunContext:
    """Load data, build the network's parts, resolve the partition (unless given).

    ``shard``: this process is replica r of R and batches only its shard of every batch.
    """
    start = time.time()
    if data is None:
        data = load_data(cfg.data, cfg.seed)
    batches = Batches(data, cfg.data, cfg.seed, shard=shard, pin_memory=device.type == "cuda")
    parts = build_parts(cfg, (data.channels, data.image_size, data.image_size), data.num_classes)
    if partition is None:
        partition = resolve_partition(cfg, parts, batches, data.num_classes, device)
    return RunContext(
        cfg,
        device,
        parts,
        partition,
        data.num_classes,
        batches.input_shape,
        batches.steps_per_epoch,
        start,
        data,
        batches,
        normalization={"mean": data.mean.tolist(), "std": data.std.tolist()},
    )


def context_from_shape_info(cfg: Config, device: torch.device, info: dict) -> RunContext:
    """A context for a rank that reads no data, from rank 0's :meth:`RunContext.shape_info`."""
    input_shape = tuple(info["input_shape"])
    parts = build_parts(cfg, input_shape, info["num_classes"])
    return RunContext(
        cfg,
        device,
        parts,
        [tuple(r) for r in info["partition"]],
        info["num_classes"],
        input_shape,
        info["steps_per_epoch"],
        time.time(),
        normalization=info["normalization"],
        _split_sizes=info["split_sizes"],
    )
