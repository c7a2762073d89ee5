"""Process groups of the pipeline: a ("pp", "dp") DeviceMesh over the ranks torchrun started.

Control (headers, abort flag, progress, results) goes over gloo and the rendezvous
key-value store; activations go over NCCL when every rank has a GPU of its own, else over gloo
(host-staged when ranks share a GPU: NCCL refuses two ranks on one GPU and gloo cannot send CUDA
tensors). One default group carries both: ``cpu:gloo,cuda:nccl`` dispatches each tensor to the
backend of its device, so the mesh's groups need no bookkeeping of their own. A stage's replicas
average gradients over the mesh's "dp" group; neighbouring stages talk over the "pp" group.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from trgl_pipe.config import Config
from trgl_pipe.errors import ConfigError, PipelineError
from trgl_pipe.runtime.layout import Layout, check_world_size


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

    @property
    def nnodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def layout_of(cfg: Config) -> Layout:
    return Layout(cfg.model.num_modules, cfg.pipeline.modules_per_rank, cfg.pipeline.replicas)


def check_launch(cfg: Config, env: LaunchEnv) -> Layout:
    """One-line errors for launches that cannot work, before any process group exists."""
    if cfg.train.regime in ("ddg", "fr"):
        if cfg.train.delays != "paper":
            raise ConfigError(
                f"train.regime={cfg.train.regime} runs across ranks with train.delays=paper only; set "
                "train.delays=paper, or run it in one process with python -m trgl_pipe.run"
            )
        if cfg.pipeline.sync_batchnorm and cfg.pipeline.replicas > 1:
            raise ConfigError(
                f"train.regime={cfg.train.regime} runs its replicas with per-replica BatchNorm "
                "statistics only so far (a delayed backward through SyncBatchNorm is untested); "
                "drop pipeline.sync_batchnorm"
            )
    elif cfg.train.regime != "parallel":
        raise ConfigError(
            f"train.regime={cfg.train.regime} cannot run across ranks (only parallel can: sequential "
            "regimes train one module at a time); run it in one process with python -m trgl_pipe.run"
        )
    if cfg.pipeline.transport == "sim":
        raise ConfigError("pipeline.transport=sim runs in one process; start it without torchrun")
    layout = layout_of(cfg)
    check_world_size(layout, env.world_size, env.nnodes)
    return layout


# ---------------------------------------------------------------------------------------------
# Failures: one record on the store names the rank that failed first and why


@dataclass(frozen=True)
class Failure:
    """The first failure of the run, as every rank learns it from the store."""

    rank: int
    modules: list[int]
    message: str  # follows "rank k (module m)": ": <reason>" or " failed: <exception>"
    code: int
    user_error: bool  # the cause is bad input the failing rank already explained

    def describe(self) -> str:
        where = f"rank {self.rank}" + (f" (module {_modules_text(self.modules)})" if self.modules else "")
        return f"{where}{self.message}"


def _modules_text(modules: list[int]) -> str:
    return str(modules[0]) if len(modules) == 1 else f"{modules[0]}-{modules[-1]}"


class AbortedError(PipelineError):
    """Another rank failed first; ``failure`` says which and why."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(f"stopping because {failure.describe()}")
        self.failure = failure
        self.exit_code = failure.code


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
        failure = self.failure()
        if failure is not None:
            raise AbortedError(failure)

    def failure(self) -> Failure | None:
        """The recorded failure, if any (one store round trip)."""
        try:
            if not self.store.check(["abort"]):
                return None
            raw = self.store.get("abort").decode()
        except Exception:  # the store went down with rank 0: the caller's own error stands
            return None
        try:
            return Failure(**json.loads(raw))
        except (ValueError, TypeError):
            return Failure(-1, [], f": {raw}", 1, False)

    def wait_for_failure(self, grace_s: float) -> Failure | None:
        """A failure recorded within ``grace_s``: a rank posts its cause before its sockets close,
        so a neighbour that sees the connection drop finds the cause here."""
        deadline = time.monotonic() + grace_s
        while True:
            failure = self.failure()
            if failure is not None or time.monotonic() >= deadline:
                return failure
            time.sleep(0.05)

    def abort(self, failure: Failure) -> Failure:
        """Record ``failure`` unless another rank recorded one first; returns the one on record."""
        record = json.dumps(failure.__dict__)
        # the store may be gone with a failed rank 0; torchrun still stops the others then
        with contextlib.suppress(Exception):
            self.store.compare_set("abort", "", record)
        return self.failure() or failure


# ---------------------------------------------------------------------------------------------
# Devices and backends


def device_identity(device: torch.device) -> str:
    """The physical device behind ``device``: host and GPU UUID (CUDA_VISIBLE_DEVICES-proof)."""
    if device.type != "cuda":
        return "cpu"
    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", device.index))
    mig = is_mig(props.name, os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    return f"{socket.gethostname()}/{uuid}" + (MIG_SUFFIX if mig else "")


MIG_SUFFIX = "/mig"


def is_mig(device_name: str, visible_devices: str) -> bool:
    """A MIG instance (a slice of a GPU): CUDA names it "<GPU> MIG <profile>", and
    ``CUDA_VISIBLE_DEVICES`` selects it by a "MIG-" UUID. Each has a UUID of its own, so without
    this check two slices of one GPU would look like two GPUs, and NCCL cannot link MIG instances."""
    return " MIG " in f" {device_name} " or "MIG-" in visible_devices


def choose_data_backend(requested: str, identities: list[str]) -> str:
    """NCCL when every rank has a GPU no other rank uses, else gloo (host-staged for GPUs).

    ``identities`` holds :func:`device_identity` of every rank. One visible GPU per rank (Slurm's
    ``CUDA_VISIBLE_DEVICES`` per task) is a GPU of its own, however the devices are numbered.
    """
    on_gpu = [i for i in identities if i != "cpu"]
    mig = [i for i in on_gpu if i.endswith(MIG_SUFFIX)]
    own = len(on_gpu) == len(identities) and len(set(on_gpu)) == len(on_gpu) and not mig
    if requested == "nccl" and not own:
        shared = len(on_gpu) - len(set(on_gpu))
        if len(on_gpu) < len(identities):
            why = f"{len(identities) - len(on_gpu)} ranks have no GPU"
        elif shared:
            why = f"{shared} ranks share a GPU with another rank"
        else:
            why = f"{len(mig)} ranks run on MIG instances, which NCCL cannot link"
        raise ConfigError(
            f"pipeline.backend=nccl needs a GPU of its own on every rank, but {why}; "
            "use pipeline.backend=gloo or auto"
        )
    return "nccl" if own and requested in ("auto", "nccl") else "gloo"


@dataclass
class DistSession:
    env: LaunchEnv
    layout: Layout
    store: Any
    control: StoreControl
    data_backend: str
    staged: bool  # activations on a GPU sent by gloo through pinned host memory
    mesh: Any  # DeviceMesh ("pp", "dp")
    pp_group: Any
    dp_group: Any
    timeout: timedelta = timedelta(seconds=60)  # pipeline.timeout_s, for every group once training runs
    backward_group: Any = None  # the link back (gradients, weights): the pipeline's ranks again

    @property
    def stage(self) -> int:
        return self.layout.stage_of(self.env.rank)

    @property
    def replica(self) -> int:
        return self.layout.replica_of(self.env.rank)

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


def connect_store(env: LaunchEnv, startup_timeout_s: float) -> Any:
    """The rendezvous store (torchrun's own when it offers one), namespaced by restart."""
    raw = dist.TCPStore(
        env.master_addr,
        env.master_port,
        env.world_size,
        is_master=env.rank == 0 and not env.agent_store,
        timeout=timedelta(seconds=startup_timeout_s),
        wait_for_workers=False,
    )
    return dist.PrefixStore(f"trgl_pipe/{env.restart_count}", raw)


def agree_on_backend(
    cfg: Config,
    env: LaunchEnv,
    store: Any,
    control: StoreControl,
    device: torch.device,
    startup_timeout_s: float,
) -> str:
    """Every rank posts its device; all compute the same backend from the same list."""
    store.set(f"device/{env.rank}", device_identity(device))
    keys = [f"device/{r}" for r in range(env.world_size)]
    deadline = time.monotonic() + startup_timeout_s
    while not store.check(keys):
        control.check()  # a rank that failed before posting its device has recorded why
        if time.monotonic() > deadline:
            raise PipelineError(f"rank {env.rank}: waited {startup_timeout_s:g} s for every rank to start")
        time.sleep(0.05)
    identities = [store.get(k).decode() for k in keys]
    return choose_data_backend(cfg.pipeline.backend, identities)


def init_distributed(
    cfg: Config,
    env: LaunchEnv,
    layout: Layout,
    device: torch.device,
    store: Any,
    control: StoreControl,
    startup_timeout_s: float,
    link_back: bool = False,
) -> DistSession:
    """Agree on the data backend, create the default group and the ("pp", "dp") mesh; with
    ``link_back`` (or a delayed-gradient regime) also a communicator for messages from each rank
    to the one before it."""
    data_backend = agree_on_backend(cfg, env, store, control, device, startup_timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "cpu:gloo,cuda:nccl" if data_backend == "nccl" else "gloo"
    timeout = timedelta(seconds=cfg.pipeline.timeout_s)
    dist.init_process_group(
        backend,
        store=dist.PrefixStore("pg", store),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=max(startup_timeout_s, cfg.pipeline.timeout_s)),
    )
    # A peer that does not answer within pipeline.timeout_s has failed: the same limit for every
    # wait inside torch.distributed (NCCL's watchdog included) as for the runtime's own waits. The
    # replicas' group keeps the start-up limit until training starts (DDP's set-up broadcast and
    # the first all-reduce may wait for a replica still reading data or compiling).
    startup = timedelta(seconds=max(startup_timeout_s, cfg.pipeline.timeout_s))
    mesh, pp_group, dp_group = create_mesh(layout, env.rank, device.type, timeout, startup)
    # the link back (ddg and fr's gradients, MAN's weights): its own communicator, created after
    # the mesh on every rank
    link_back = link_back or cfg.train.regime in ("ddg", "fr")
    backward = pipeline_group(layout, env.rank, timeout) if link_back else None
    staged = device.type == "cuda" and data_backend == "gloo"
    return DistSession(
        env, layout, store, control, data_backend, staged, mesh, pp_group, dp_group, timeout, backward
    )


def create_mesh(
    layout: Layout, rank: int, device_type: str, pp_timeout: timedelta, dp_timeout: timedelta
) -> tuple[DeviceMesh, Any, Any]:
    """The ("pp", "dp") mesh and this rank's two groups, created alike on every rank.

    ``init_device_mesh`` decides from ``torch.cuda.is_available()`` whether to create a new group
    for a dimension that spans the world; when some ranks have a GPU and others not, the GPU
    ranks then wait in ``new_group`` for ranks that never call it. Here every rank creates every
    group of the mesh, in the same order, whatever its device, and the mesh is built from them.
    """
    stages, replicas = layout.mesh_shape
    pp_group = pipeline_group(layout, rank, pp_timeout)
    dp_group = None
    for stage in range(stages):  # the replicas of one stage
        ranks = [layout.rank_of(stage, r) for r in range(replicas)]
        group = dist.new_group(ranks, timeout=dp_timeout)
        if rank in ranks:
            dp_group = group
    grid = torch.arange(stages * replicas).view(stages, replicas)
    mesh = DeviceMesh.from_group([pp_group, dp_group], device_type, mesh=grid, mesh_dim_names=("pp", "dp"))
    return mesh, pp_group, dp_group


def pipeline_group(layout: Layout, rank: int, timeout: timedelta) -> Any:
    """This rank's pipeline (stage 0 → stage S−1 of its replica) as a group of its own; every rank
    creates every replica's group, in the same order (``new_group`` is collective).

    Called twice for the delayed-gradient regimes: the backward link gets a communicator of its
    own, because NCCL ignores tags. On one communicator, two ranks that each post a send to the
    other (an activation forward, a gradient backward) may each wait for the other's receive;
    with two, each direction is ordered on its own and neither can block the other.
    """
    stages, replicas = layout.mesh_shape
    mine = None
    for replica in range(replicas):
        ranks = [layout.rank_of(s, replica) for s in range(stages)]
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = group
    return mine


def training_starts(session: DistSession) -> None:
    """From now on a replica that does not answer within pipeline.timeout_s has failed.

    (torchtitan sets its mesh groups' timeouts the same way; newer torch renamed the function
    set_timeout and warns about the old name, which every supported version still has.)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dist.distributed_c10d._set_pg_timeout(session.timeout, session.dp_group)


def shutdown(session: DistSession, timeout_s: float) -> None:
    """Every rank meets here (on the store, so any backend works), then the groups are destroyed."""
    env = session.env
    session.store.set(f"done/{env.rank}", "1")
    keys = [f"done/{r}" for r in range(env.world_size)]
    deadline = time.monotonic() + timeout_s
    while not session.store.check(keys):
        session.control.check()
        if time.monotonic() > deadline:
            missing = [r for r in range(env.world_size) if not session.store.check([f"done/{r}"])]
            raise PipelineError(f"rank {env.rank}: waited {timeout_s:g} s for ranks {missing} to finish")
        time.sleep(0.05)
    dist.destroy_process_group()
