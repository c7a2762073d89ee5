"""The program of one pipeline rank under torchrun.

Ranks form a (stage, replica) mesh (:mod:`trgl_pipe.runtime.layout`): the rank of stage s holds
modules s·M … s·M+M−1 and, with R replicas, trains on shard r of every batch. Global rank 0 reads
the data first, decides the split and whether to resume, and shares that through the store; the
first stage's other replicas read their shards themselves. Every rank receives from the rank
before it (same replica), trains its modules on each batch, and sends the detached output on.
At the end rank 0 collects every rank's results through the store and writes summary.json.

Failures: a rank that fails records its rank, modules and reason on the store before it exits
and prints one line; the others stop at their next wait and report that cause (a neighbour that
only saw the connection drop looks the cause up first). Exit codes are those of the same error
in one process (2 for bad input, 3 for a non-finite loss, 1 otherwise, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import torch

from trgl_pipe.config import Config
from trgl_pipe.context import (
    RunContext,
    build_context,
    configure_torch,
    context_from_shape_info,
    resolve_device,
)
from trgl_pipe.data import load_data, shard_bounds
from trgl_pipe.errors import ConfigError, OutputError, PipelineError, UserError
from trgl_pipe.faults import Tracer
from trgl_pipe.folder.checkpoint import find_resume
from trgl_pipe.folder.run_folder import RunFolder, claim, lock_token
from trgl_pipe.launch import record_failure
from trgl_pipe.objectives import objective_class
from trgl_pipe.runtime import preemption
from trgl_pipe.runtime.buffer import Waiter
from trgl_pipe.runtime.clock import clock_for
from trgl_pipe.runtime.layout import Layout, slot_samples
from trgl_pipe.runtime.mesh import (
    AbortedError,
    DistSession,
    Failure,
    LaunchEnv,
    StoreControl,
    check_launch,
    connect_store,
    init_distributed,
    shutdown,
    training_starts,
)
from trgl_pipe.runtime.schedule import Position, parallel_stream
from trgl_pipe.runtime.transport import BackwardLinks, DistInbox, DistOutbox, LinkSettings, StreamInbox
from trgl_pipe.training.from_next import connect_link_back
from trgl_pipe.training.loop import rank_stats, run_worker
from trgl_pipe.training.replicas import replicate, sync_batchnorm
from trgl_pipe.training.skeleton import RunSkeleton, metrics_path
from trgl_pipe.watch.live import LiveView, Publisher, StoreBoard
from trgl_pipe.watch.spans import SpanRecorder
from trgl_pipe.watch.summary import build_summary, stage_figures
from trgl_pipe.watch.telemetry import Telemetry

STARTUP_TIMEOUT_S = 900.0  # rank 0 may spend minutes reading a large image folder, ranks compiling


# ---------------------------------------------------------------------------------------------
# Setup: what to build, from the data rank 0 reads


def _setup(cfg: Config, session: DistSession, device: torch.device, folder: RunFolder | None) -> RunContext:
    """Rank 0 reads the data and decides split and resume; the others build from what it shares.

    Nothing is written here: rank 0 holds the run folder (``folder``) and writes once every rank
    has checked its part (:func:`_ready_barrier`).
    """
    rank, layout = session.env.rank, session.layout
    shard = (session.replica, layout.replicas)
    if rank == 0:
        assert folder is not None
        ctx = build_context(cfg, device, shard=shard)
        resume = find_resume(cfg, ctx.partition, cfg.train.regime, ctx.steps_per_epoch)
        ctx.resume_from = None if resume is None else str(resume)
        session.publish_json("setup", {**ctx.shape_info(), "resume": ctx.resume_from, "token": folder.token})
        _check_shared_out_dir(cfg, session, folder.token)
        return ctx
    info = session.wait_json("setup", STARTUP_TIMEOUT_S, "rank 0 to read the data")
    _check_shared_out_dir(cfg, session, info["token"])
    if session.stage == 0:  # another replica of the first stage: it reads its own shards
        data = load_data(cfg.data, cfg.seed)
        partition = [tuple(r) for r in info["partition"]]
        ctx = build_context(cfg, device, data, shard=shard, partition=partition)
    else:
        ctx = context_from_shape_info(cfg, device, info)
    ctx.check_same_network(info, rank)
    ctx.resume_from = info["resume"]
    return ctx


def _check_shared_out_dir(cfg: Config, session: DistSession, token: str) -> None:
    """Every rank must see the out_dir rank 0 locked (its metrics, checkpoints and the resume all
    live there): on several nodes, one shared folder. Each rank publishes whether it reads rank
    0's lock token back, and every rank raises the same one line naming those that do not."""
    env, out = session.env, Path(cfg.out_dir)
    hidden = cfg.debug.hide_out_dir_from_rank == env.rank
    seen = None if hidden else lock_token(out)
    session.publish_json(
        f"out_dir/{env.rank}", {"ok": env.rank == 0 or seen == token, "host": socket.gethostname()}
    )
    verdicts = [
        session.wait_json(f"out_dir/{r}", STARTUP_TIMEOUT_S, f"rank {r} to look at out_dir")
        for r in range(env.world_size)
    ]
    blind = [f"{r} on {v['host']}" for r, v in enumerate(verdicts) if not v["ok"]]
    if blind:
        raise ConfigError(
            f"out_dir={out} is not the folder rank 0 holds, as rank {', '.join(blind)} sees it: ranks on "
            "several nodes need one shared out_dir (a network file system mounted at the same path on "
            "every node)"
        )


def batch_sizes(cfg: Config, ctx: RunContext, replica: int, replicas: int) -> tuple[list[int], list[int]]:
    """Every batch size this replica's modules will see: training shards, evaluation shards."""
    sizes = ctx.split_sizes
    b, spe = cfg.data.batch_size, ctx.steps_per_epoch
    train = [b]
    if spe * b > sizes["train"]:  # the last batch is partial
        train.append(sizes["train"] - (spe - 1) * b)
    evals = []
    for split in ("val", "test"):
        n = sizes[split]
        evals.append(min(cfg.data.eval_batch_size, n))
        if n % cfg.data.eval_batch_size:
            evals.append(n % cfg.data.eval_batch_size)

    def shard(n: int) -> int:
        lo, hi = shard_bounds(n, replica, replicas)
        return hi - lo

    return [shard(n) for n in train], [shard(n) for n in evals]


def warm_up_sizes(per_replica: list[list[int]]) -> list[list[int]]:
    """The training batch sizes each replica compiles in its warm-up, one pass each: its distinct
    sizes, the last repeated until every replica makes the same number of passes.

    A training pass through SyncBatchNorm is a collective per layer over the replicas. Shards of
    one batch can differ by a sample, so one replica may see one distinct size (64 and 63 split
    into 32 and 32) where another sees two (32 and 31): with a pass per distinct size the first
    would stop after one pass while the second waits in its second pass's collective for ever.
    """
    distinct = [list(dict.fromkeys(sizes)) for sizes in per_replica]
    passes = max(len(sizes) for sizes in distinct)
    return [sizes + sizes[-1:] * (passes - len(sizes)) for sizes in distinct]


def _merge_metrics(out_dir: Path, world_size: int) -> None:
    """Append the other ranks' events to metrics.jsonl (where rank 0 can see their files).

    Whole lines only: a failed append is cut back, and a rank's file goes only once it is merged.
    """
    target = out_dir / "metrics.jsonl"
    for rank in range(1, world_size):
        path = metrics_path(out_dir, rank)
        if not path.is_file():
            continue
        text = path.read_text()
        end = target.stat().st_size if target.exists() else 0
        try:
            with open(target, "a") as merged:
                merged.write(text[: text.rfind("\n") + 1])
        except OSError as error:
            with contextlib.suppress(OSError):
                os.truncate(target, end)
            raise OutputError(target, error) from error
        path.unlink()


def _ready_barrier(session: DistSession) -> None:
    """All ranks start training together: none waits on a neighbour still compiling."""
    env = session.env
    session.store.set(f"ready/{env.rank}", "1")
    for r in range(env.world_size):
        session.wait_json(f"ready/{r}", STARTUP_TIMEOUT_S, f"rank {r} to get ready")


# ---------------------------------------------------------------------------------------------
# Training


def _train(cfg: Config, session: DistSession, ctx: RunContext, folder: RunFolder | None) -> bool:
    """Train this rank's modules; False if the run stopped early on SIGTERM (every rank agrees)."""
    env, layout = session.env, session.layout
    rank, stage_index, replica = env.rank, session.stage, session.replica
    out_dir = Path(cfg.out_dir)
    # the replicas hold the same weights: one of them writes the checkpoints
    run = RunSkeleton(cfg, ctx, rank=rank, writes_checkpoints=replica == 0, shows=rank == 0)
    if rank == 0:
        print(f"data: {ctx.data.describe()}", flush=True)
        print(
            f"pipeline: {layout.describe()} · blocks per module {[b - a for a, b in ctx.partition]} · "
            f"activations over {session.data_backend}{' (host-staged)' if session.staged else ''}",
            flush=True,
        )
    device = ctx.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    transform = None
    if cfg.pipeline.sync_batchnorm and layout.replicas > 1:
        transform = lambda module: sync_batchnorm(module, session.dp_group)  # noqa: E731
    stages = [ctx.build_stage(k, transform) for k in layout.modules_of_stage(stage_index)]
    delayed = cfg.train.regime in ("ddg", "fr")
    for stage in stages:  # ddg and fr average their delayed gradients themselves (attach_rank)
        replicate(stage, session.dp_group, ddp=not delayed)
    clock = clock_for(device)
    chain = run.make_workers(stages, clock, {"replica": replica} if layout.replicas > 1 else {})
    if delayed:  # before a resume: the shards carry the work in flight
        from trgl_pipe.training.delayed import attach_rank

        attach_rank(chain, cfg, layout.num_modules, session.dp_group)
    start = Position()
    progress = run.restore(None if ctx.resume_from is None else Path(ctx.resume_from), announce=rank == 0)
    if progress is not None:
        start = Position(progress.epoch, progress.batch, progress.step)
    should_stop = preemption.shared_flag(session.store, rank)
    capacity = cfg.pipeline.buffer_size
    previous, following = layout.previous_rank(rank), layout.next_rank(rank)
    slot = slot_samples(cfg.data.batch_size, cfg.data.eval_batch_size, layout.replicas)
    link = LinkSettings(session.pp_group, capacity, slot, device, cfg.pipeline.timeout_s, session.staged)
    inbox: Any
    agreement: preemption.Agreed | None = None
    if previous is None:
        stream_stop = should_stop
        if layout.replicas > 1:
            stream_stop = agreement = preemption.agreed(should_stop, session.dp_group, cfg.pipeline.timeout_s)
        inbox = StreamInbox(parallel_stream(cfg, ctx.batches, start, stream_stop))
        in_shape, in_dtype = ctx.input_shape, torch.float32
    else:
        inbox = DistInbox(
            rank,
            previous,
            link,
            # the image follows each training batch while this rank or a later one reads it
            ctx.input_shape if any(w.reads_image or w.passes_image for w in chain) else None,
        )
        in_shape, in_dtype = inbox.handshake()
    with torch.no_grad():  # the shape and dtype of each module's output, for the next one
        probe = torch.zeros((1, *in_shape), dtype=in_dtype)
        shapes = []
        for stage in stages:
            shapes.append((tuple(probe.shape[1:]), probe.dtype))
            probe = stage.forward_frozen(probe)
    outbox = None
    if following is not None:
        outbox = DistOutbox(rank, following, link)
        wire = chain[-1].wire_dtype or probe.dtype  # pipeline.wire_dtype: what the worker casts to
        outbox.handshake(tuple(probe.shape[1:]), wire, cfg.train.channels_last and probe.dim() == 4)
    links = None
    if delayed:  # the backward link: gradients from the next rank to this one
        backward = dataclasses.replace(link, group=session.backward_group)  # a communicator of its own
        links = BackwardLinks.connect(rank, previous, following, backward, (in_shape, in_dtype))
    back = None
    if session.backward_group is not None and not delayed:  # weights (MAN) or gradients (HPFF)
        group = session.backward_group
        back = connect_link_back(chain, rank, previous, following, link, group, (in_shape, in_dtype))
    # every replica warms up with as many training passes (SyncBatchNorm's collectives)
    every = [batch_sizes(cfg, ctx, r, layout.replicas) for r in range(layout.replicas)]
    train_sizes, eval_sizes = warm_up_sizes([train for train, _ in every])[replica], every[replica][1]
    for stage, (shape, dtype) in zip(stages, shapes, strict=True):
        stage.warm_up(shape, dtype, train_sizes, eval_sizes)
    _ready_barrier(session)
    # every rank has checked its part (shards, shapes): from here on the run writes
    run.begin(
        folder,
        env.world_size,
        world_size=env.world_size,
        backend=session.data_backend,
        layout=layout.describe(),
    )
    watch = run.watch
    training_starts(session)

    tracer = Tracer(out_dir / f"trace.rank{rank}.jsonl" if cfg.debug.trace else None, device)
    span_meta = {"rank": rank, "stage": stage_index, "replica": replica, "modules": layout.modules_of(rank)}
    spans = SpanRecorder(
        out_dir / "spans" / f"rank{rank}.tsv" if cfg.log.timeline else None,
        span_meta,
        append=ctx.resume_from is not None,
    )
    waiter = Waiter(session.control, cfg.pipeline.timeout_s, f"rank {rank}")
    keys = [f"module/{k}" for k in range(layout.num_modules)] + [f"rank/{r}" for r in range(env.world_size)]
    board = StoreBoard(session.store, keys)
    if watch is not None:
        watch.attach_board(board, {r: layout.modules_of(r)[0] for r in range(env.world_size)})
    interval = cfg.log.live_interval_s
    publishers = [Publisher(board if replica == 0 else None, f"module/{w.index}", interval) for w in chain]
    telemetry = Telemetry(device)
    monitor = (Publisher(board, f"rank/{rank}", interval), telemetry)
    if links is not None:
        links.serve([w.carry for w in chain], waiter, clock)
    if back is not None:
        back.serve(waiter)
    run.start()
    view = LiveView(board, cfg.log.live if rank == 0 else "off", interval, f"trgl_pipe · {layout.describe()}")
    with view:
        stop = run_worker(
            chain,
            inbox,
            outbox,
            waiter,
            clock,
            publishers,
            poll=None if previous is None else should_stop,
            tracer=tracer,
            monitor=monitor,
            spans=spans,
        )
        if links is not None:
            links.close(waiter)
        if back is not None:
            back.close(waiter)
    if agreement is not None:  # its last all-reduce must end before the groups are destroyed
        agreement.drain()
    tracer.close()
    spans.close()
    run.stop_profiler()
    if stop.preempted:
        run.preempted(module=chain[0].index, rank=rank, wall_time_s=run.wall_time_s)
        return False
    run.ended(module=chain[0].index, rank=rank, wall_time_s=run.wall_time_s)
    stats = {
        **rank_stats(chain, inbox, outbox, clock, device, rank),
        **({"grad_sent_bytes": links.sent_bytes} if links is not None else {}),
        # what this rank allocated to receive activations (GPU or pinned host memory)
        "receive_slot_bytes": getattr(inbox, "slot_bytes", 0),
        "stage": stage_index,
        "replica": replica,
        **telemetry.summary(),
    }
    session.publish_json(f"result/{rank}", {"modules": [w.report() for w in chain], "rank": stats})
    if rank == 0:
        results = [
            session.wait_json(f"result/{r}", cfg.pipeline.timeout_s, f"the results of rank {r}")
            for r in range(env.world_size)
        ]
        modules = [m for r in results if r["rank"]["replica"] == 0 for m in r["modules"]]
        ranks = [r["rank"] for r in results]
        summary = build_summary(
            cfg, modules, ranks, run.wall_time_s, ctx.data, ctx.partition, "dist", env.world_size
        )
        summary["data_backend"] = session.data_backend
        summary["layout"] = {
            "modules_per_rank": layout.modules_per_rank,
            "replicas": layout.replicas,
            "stages": layout.num_stages,
        }
        summary["stages"] = stage_figures(ranks, layout.num_stages)
        run.finish(summary, before_write=lambda: _merge_metrics(out_dir, env.world_size))
    return True


# ---------------------------------------------------------------------------------------------
# Entry point and failures


_STALLED = re.compile(r"rank (\d+): waited (\S+) s for .*?\brank (\d+)\b.*; that peer is stuck or dead")


def _failure_of(error: BaseException, rank: int, layout: Layout) -> Failure:
    """The failure ``error`` stands for: a wait for another rank that ran out names that rank."""
    code = int(getattr(error, "exit_code", 1))
    stalled = _STALLED.match(str(error)) if isinstance(error, PipelineError) else None
    if stalled is not None and int(stalled.group(1)) == rank:
        peer = int(stalled.group(3))
        message = (
            f": stuck or dead: its neighbours waited {stalled.group(2)} s for it "
            "(pipeline.timeout_s sets this limit)"
        )
        return Failure(peer, layout.modules_of(peer), message, code, False)
    if isinstance(error, UserError):
        message = f": {error}"
    elif isinstance(error, PipelineError):
        message = f": {str(error).removeprefix(f'rank {rank}: ')}"
    else:
        message = f" failed: {type(error).__name__}: {error}"
    return Failure(rank, layout.modules_of(rank), message, code, isinstance(error, UserError))


def _stop_stuck_peer(store: Any, peer: int) -> None:
    """SIGKILL rank ``peer`` if it runs on this host, once its neighbours have recorded it as stuck.

    A rank that does not answer may be stopped (SIGSTOP) or hung in native code: torchrun's
    SIGTERM then does nothing, and torchrun waits a fixed 30 s before its own SIGKILL, which the
    launcher would then report as the cause. Killed now, the job ends within
    ``pipeline.timeout_s`` plus a few seconds, and the recorded cause (the neighbours' "stuck or
    dead") is what is reported (``_root_cause`` in :mod:`trgl_pipe.launch`). A peer on another host is
    left to its own agent.
    """
    try:
        host, pid = store.get(f"pid/{peer}").decode().rsplit(":", 1)
        if host == socket.gethostname():
            os.kill(int(pid), signal.SIGKILL)
    except Exception:  # gone already, or the store with it: nothing left to stop
        pass


def _report_failure(error: BaseException, rank: int, layout: Layout, control: StoreControl | None) -> int:
    """Say ``error`` once for the whole job and record it for the others; returns the exit code.

    The line goes to torchrun's error file of this rank (:func:`trgl_pipe.launch.record_failure`,
    which ``launch/torchrun.sh`` prints last); it is printed here only by the rank that failed
    first, and only when no launcher prints it. Ranks that stop because of it stay silent.
    """
    failure = error.failure if isinstance(error, AbortedError) else None
    if failure is None and not isinstance(error, UserError) and control is not None:
        # a lost connection, a timeout or a transfer error is often the echo of a neighbour's own
        # failure, which that neighbour recorded before its sockets closed
        earlier = control.wait_for_failure(grace_s=2.0)
        if earlier is not None and earlier.rank != rank:
            failure = earlier
    if failure is not None:  # another rank failed first: it says why
        record_failure(f"error: {failure.describe()}", failure.code)
        return failure.code
    failure = _failure_of(error, rank, layout)
    recorded = control.abort(failure) if control is not None else failure
    launched = record_failure(f"error: {recorded.describe()}", recorded.code)
    diagnosed = failure.rank != rank  # _failure_of named a peer that stopped answering
    if (
        diagnosed
        and control is not None
        and (recorded.rank, recorded.message) == (failure.rank, failure.message)
    ):
        _stop_stuck_peer(control.store, failure.rank)
    if recorded != failure and recorded.message == failure.message:
        return failure.code  # every rank found the same problem: the first to record it says it
    if not launched or recorded != failure:
        print(f"error: {failure.describe()}", file=sys.stderr, flush=True)
    return failure.code


def run_rank(cfg: Config, exit_process: bool = True) -> dict[str, Any] | None:
    """Entry point of one rank; exits the process on failure so no rank waits forever.

    With ``exit_process=False`` (the Python API) a rank that completes returns the summary
    (rank 0 wrote it; ranks that cannot see ``out_dir`` return None) instead of exiting.
    """
    env = LaunchEnv.from_environ()
    if env.world_size == 1:
        raise UserError(
            "pipeline.transport=dist needs several ranks: torchrun --nproc_per_node=K -m trgl_pipe.run ..."
        )
    layout: Layout = check_launch(cfg, env)  # every rank finds the same error; rank 0 prints it
    if (
        cfg.pipeline.sync_batchnorm
        and layout.replicas > 1
        and resolve_device(cfg.device, env.local_rank).type != "cuda"
    ):
        raise ConfigError(
            "pipeline.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm runs on CUDA only; "
            "drop it (each replica then normalises with its own shard's statistics)"
        )
    configure_torch(cfg, ranks_on_host=env.local_world_size)
    control: StoreControl | None = None
    folder: RunFolder | None = None
    preemption.install()
    code = 0
    try:
        store = connect_store(env, STARTUP_TIMEOUT_S)
        store.set(f"pid/{env.rank}", f"{socket.gethostname()}:{os.getpid()}")  # see _stop_stuck_peer
        control = store_control = StoreControl(store)
        preemption.install(job_failed=lambda: store_control.failure() is not None)
        device = resolve_device(cfg.device, env.local_rank)
        link_back = bool(objective_class(cfg).needs_from_next)  # MAN's weights, HPFF's gradients
        session = init_distributed(cfg, env, layout, device, store, control, STARTUP_TIMEOUT_S, link_back)
        folder = claim(cfg) if env.rank == 0 else None  # only rank 0 locks and writes the run files
        if folder is not None:
            preemption.before_failed_exit(folder.release)
        ctx = _setup(cfg, session, device, folder)
        completed = _train(cfg, session, ctx, folder)
        shutdown(session, cfg.pipeline.timeout_s)
        if not completed:
            code = preemption.EXIT_CODE
            if env.rank == 0:  # under the launcher it prints the line last, after torchrun's logs
                line = (
                    f"stopped: SIGTERM; the checkpoint in {Path(cfg.out_dir) / 'checkpoints'} is complete, "
                    "continue with resume=auto"
                )
                if not record_failure(line, code):
                    print(line, file=sys.stderr, flush=True)
    except BaseException as error:
        code = _report_failure(error, env.rank, layout, control)
    if folder is not None:
        folder.release()
    if code == 0 and not exit_process:
        path = Path(cfg.out_dir) / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else None
    # A failed pipeline cannot be torn down politely (peers may be gone mid-transfer): leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
