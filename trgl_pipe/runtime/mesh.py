"""Process-group setup for the pipeline: one rank per module, started by torchrun.

Control (headers, credits, abort flag, progress, results) goes over gloo and the rendezvous
key-value store; activations go over NCCL when every rank has a GPU of its own, else over gloo
(with host-staged copies when the ranks share GPUs: NCCL refuses two ranks on one GPU and gloo
cannot send CUDA tensors).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from trgl_pipe.config import Config
from trgl_pipe.errors import ConfigError, PipelineError
from trgl_pipe.runtime.transport import PairGroups, create_pair_groups


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun tells each worker through the environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    restart_count: int
    agent_store: bool

    @classmethod
    def from_environ(cls) -> LaunchEnv:
        env = os.environ
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ConfigError(
                "pipeline.transport=dist needs the environment torchrun sets (missing "
                f"{', '.join(missing)}); start with torchrun --nproc_per_node=K -m trgl_pipe.run ..."
            )
        world = int(env["WORLD_SIZE"])
        return cls(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env["MASTER_PORT"]),
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
        )


def check_launch(cfg: Config, env: LaunchEnv) -> None:
    """One-line errors for launches that cannot work, before any process group exists."""
    if cfg.train.regime != "parallel":
        raise ConfigError(
            f"train.regime={cfg.train.regime} cannot run across ranks (only parallel can: sequential "
            "regimes train one module at a time); run it in one process with python -m trgl_pipe.run"
        )
    if env.world_size != cfg.model.num_modules:
        raise ConfigError(
            f"torchrun started {env.world_size} ranks but model.num_modules={cfg.model.num_modules}; "
            f"start one rank per module (--nproc_per_node={cfg.model.num_modules}) or set "
            f"model.num_modules={env.world_size}"
        )
    if cfg.pipeline.transport == "sim":
        raise ConfigError("pipeline.transport=sim runs in one process; start it without torchrun")


class StoreControl:
    """Abort flag on the rendezvous store, checked at most every ``every_s`` seconds."""

    def __init__(self, store: Any, every_s: float = 0.5) -> None:
        self.store = store
        self.every_s = every_s
        self._next = 0.0

    def check(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every_s
        if self.store.check(["abort"]):
            raise PipelineError(f"stopping because {self.store.get('abort').decode()}")

    def abort(self, message: str) -> None:
        # the store may be gone with the failed rank; torchrun still stops the others then
        with contextlib.suppress(Exception):
            self.store.compare_set("abort", "", message)


@dataclass
class DistSession:
    env: LaunchEnv
    store: Any
    control: StoreControl
    data_backend: str
    staged: bool
    pairs: list[PairGroups]

    def publish_json(self, key: str, value: Any) -> None:
        self.store.set(key, json.dumps(value))

    def wait_json(self, key: str, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self.store.check([key]):
            self.control.check()
            if time.monotonic() > deadline:
                raise PipelineError(f"rank {self.env.rank}: waited {timeout_s:g} s for {what}")
            time.sleep(0.05)
        return json.loads(self.store.get(key))


def _own_gpu(device: torch.device, env: LaunchEnv) -> bool:
    return device.type == "cuda" and env.local_world_size <= torch.cuda.device_count()


def init_distributed(
    cfg: Config, env: LaunchEnv, device: torch.device, startup_timeout_s: float
) -> DistSession:
    """Connect to the rendezvous store, agree on the data backend, create the process groups."""
    raw_store = dist.TCPStore(
        env.master_addr,
        env.master_port,
        env.world_size,
        is_master=env.rank == 0 and not env.agent_store,
        timeout=timedelta(seconds=startup_timeout_s),
        wait_for_workers=False,
    )
    store = dist.PrefixStore(f"trgl_pipe/{env.restart_count}", raw_store)
    control = StoreControl(store)
    requested = cfg.pipeline.backend
    if requested == "nccl" and not _own_gpu(device, env):
        raise ConfigError(
            f"pipeline.backend=nccl but rank {env.rank} has no GPU of its own ({torch.cuda.device_count()} "
            f"GPUs for {env.local_world_size} ranks on this host); use pipeline.backend=gloo or auto"
        )
    mine = "nccl" if requested in ("auto", "nccl") and _own_gpu(device, env) else "gloo"
    store.set(f"backend/{env.rank}", mine)
    store.wait([f"backend/{r}" for r in range(env.world_size)], timedelta(seconds=startup_timeout_s))
    choices = {store.get(f"backend/{r}").decode() for r in range(env.world_size)}
    data_backend = "nccl" if choices == {"nccl"} else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group_timeout = timedelta(seconds=max(1800.0, 10 * cfg.pipeline.timeout_s))
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore("pg", store),
        rank=env.rank,
        world_size=env.world_size,
        timeout=group_timeout,
    )
    pairs = create_pair_groups(env.world_size, data_backend)
    staged = device.type == "cuda" and data_backend == "gloo"
    return DistSession(env, store, control, data_backend, staged, pairs)


def shutdown(session: DistSession, timeout_s: float) -> None:
    """Every rank meets here, then the process groups are destroyed."""
    dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
    dist.destroy_process_group()
