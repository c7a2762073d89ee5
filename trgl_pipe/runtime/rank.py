"""The program of one pipeline rank under torchrun: rank k trains module k.

Rank 0 reads the data and sends batches into the pipeline; every rank receives from the rank
before it, trains its module on each batch, and sends the detached output on. At the end rank 0
collects every rank's results through the store and writes summary.json.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trgl_pipe.checkpoint import CheckpointWriter, find_resume, restore_workers
from trgl_pipe.config import Config, save_config
from trgl_pipe.context import (
    RunContext,
    build_context,
    configure_torch,
    context_from_shape_info,
    prepare_out_dir,
    resolve_device,
)
from trgl_pipe.errors import PipelineError, UserError
from trgl_pipe.faults import Tracer
from trgl_pipe.live import LiveView, Publisher, StoreBoard
from trgl_pipe.metrics import MetricsLogger, describe_argv
from trgl_pipe.runtime import preemption
from trgl_pipe.runtime.buffer import Waiter
from trgl_pipe.runtime.loop import run_worker, worker_stats
from trgl_pipe.runtime.mesh import DistSession, LaunchEnv, check_launch, init_distributed, shutdown
from trgl_pipe.runtime.schedule import Position, parallel_stream
from trgl_pipe.runtime.transport import DistInbox, DistOutbox, StreamInbox
from trgl_pipe.runtime.worker import make_worker
from trgl_pipe.summary import build_summary, print_summary, write_summary

STARTUP_TIMEOUT_S = 900.0  # rank 0 may spend minutes reading a large image folder


def _setup(cfg: Config, session: DistSession, device: torch.device) -> RunContext:
    """Rank 0 reads the data and shares the shapes; the others build from those."""
    rank = session.env.rank
    if rank == 0:
        try:
            prepare_out_dir(cfg)
            ctx = build_context(cfg, device)
            save_config(cfg, Path(cfg.out_dir) / "config.yaml")
            folder = find_resume(cfg, ctx.partition, "parallel")
        except UserError as error:  # the other ranks exit quietly with the same code
            session.publish_json("setup", {"error": str(error), "code": error.exit_code})
            raise
        ctx.resume_from = None if folder is None else str(folder)
        session.publish_json("setup", {**ctx.shape_info(), "resume": ctx.resume_from})
        return ctx
    info = session.wait_json("setup", STARTUP_TIMEOUT_S, "rank 0 to read the data")
    if "error" in info:
        raise _QuietExit(info["code"])
    ctx = context_from_shape_info(cfg, device, info)
    ctx.resume_from = info["resume"]
    return ctx


class _QuietExit(Exception):
    """Rank 0 already printed the user's error; the others just exit with its code."""

    def __init__(self, code: int) -> None:
        self.code = code


def _metrics_path(out_dir: Path, rank: int) -> Path:
    return out_dir / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl")


def _merge_metrics(out_dir: Path, world_size: int) -> None:
    """Append the other ranks' events to metrics.jsonl (where rank 0 can see their files)."""
    with open(out_dir / "metrics.jsonl", "a") as merged:
        for rank in range(1, world_size):
            path = _metrics_path(out_dir, rank)
            if path.is_file():
                merged.write(path.read_text())
                path.unlink()


def _train(cfg: Config, session: DistSession, ctx: RunContext) -> bool:
    """Train this rank's module; False if training stopped early on SIGTERM."""
    env = session.env
    rank, world = env.rank, env.world_size
    out_dir = Path(cfg.out_dir)
    logger = MetricsLogger(_metrics_path(out_dir, rank), start_time=ctx.start_time)
    if rank == 0:
        logger.log(
            "start",
            argv=describe_argv(),
            regime="parallel",
            partition=ctx.partition,
            data=ctx.data.describe(),
            world_size=world,
            backend=session.data_backend,
        )
        print(f"data: {ctx.data.describe()}", flush=True)
        print(
            f"pipeline: {world} ranks · blocks per module {[b - a for a, b in ctx.partition]} · "
            f"activations over {session.data_backend}{' (host-staged)' if session.staged else ''}",
            flush=True,
        )
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    stage = ctx.build_stage(rank)
    worker = make_worker(
        stage, cfg, logger, CheckpointWriter(cfg, ctx.partition, "parallel", ctx.model_info())
    )
    start = Position()
    if ctx.resume_from is not None:
        progress = restore_workers(Path(ctx.resume_from), [worker], logger, announce=rank == 0)
        start = Position(progress.epoch, progress.batch, progress.step)
    should_stop = preemption.shared_flag(session.store, rank)
    capacity = cfg.pipeline.buffer_size
    inbox: Any
    if rank == 0:
        inbox = StreamInbox(parallel_stream(cfg, ctx.batches, start, should_stop))
        in_shape, in_dtype = ctx.input_shape, torch.float32
    else:
        inbox = DistInbox(
            rank,
            rank - 1,
            session.pairs[rank - 1],
            capacity,
            ctx.max_batch,
            ctx.device,
            session.staged,
        )
        in_shape, in_dtype = inbox.handshake()
    outbox = None
    if rank < world - 1:
        outbox = DistOutbox(rank, rank + 1, session.pairs[rank], capacity, ctx.max_batch, session.staged)
        probe = stage.forward_frozen(torch.zeros((1, *in_shape), dtype=in_dtype))
        outbox.handshake(tuple(probe.shape[1:]), probe.dtype)
    tracer = Tracer(out_dir / f"trace.rank{rank}.jsonl" if cfg.debug.trace else None)
    waiter = Waiter(session.control, cfg.pipeline.timeout_s, f"rank {rank}")
    board = StoreBoard(session.store, world)
    publisher = Publisher(board, rank, cfg.log.live_interval_s)
    t0 = time.time()
    view = LiveView(
        board,
        cfg.log.live if rank == 0 else "off",
        cfg.log.live_interval_s,
        f"trgl_pipe · pipeline of {world} ranks",
    )
    with view:
        run_worker(
            worker, inbox, outbox, waiter, publisher, poll=None if rank == 0 else should_stop, tracer=tracer
        )
    tracer.close()
    if should_stop():
        logger.log("preempted", module=rank, wall_time_s=time.time() - t0)
        logger.close()
        return False
    logger.log("end", module=rank, wall_time_s=time.time() - t0)
    logger.close()
    session.publish_json(
        f"result/{rank}",
        {
            "module": worker.report(),
            "rank": worker_stats(worker, outbox, ctx.device, rank),
        },
    )
    if rank == 0:
        results = [
            session.wait_json(f"result/{r}", cfg.pipeline.timeout_s, f"the results of rank {r}")
            for r in range(world)
        ]
        wall = time.time() - t0
        summary = build_summary(
            cfg,
            [r["module"] for r in results],
            [r["rank"] for r in results],
            wall,
            ctx.data,
            ctx.partition,
            "dist",
            world,
        )
        summary["data_backend"] = session.data_backend
        _merge_metrics(out_dir, world)
        write_summary(out_dir, summary)
        print_summary(summary)
    return True


def run_rank(cfg: Config) -> None:
    """Entry point of one rank; exits the process on failure so no rank waits forever."""
    env = LaunchEnv.from_environ()
    if env.world_size == 1:
        raise UserError(
            "pipeline.transport=dist needs several ranks: torchrun --nproc_per_node=K -m trgl_pipe.run ..."
        )
    check_launch(cfg, env)
    configure_torch(cfg, ranks_on_host=env.local_world_size)
    device = resolve_device(cfg.device, env.local_rank)
    session = init_distributed(cfg, env, device, STARTUP_TIMEOUT_S)
    preemption.install()
    code = 0
    try:
        ctx = _setup(cfg, session, device)
        completed = _train(cfg, session, ctx)
        shutdown(session, cfg.pipeline.timeout_s)
        if completed:
            return
        if env.rank == 0:
            print(
                f"stopped: SIGTERM; the checkpoint in {Path(cfg.out_dir) / 'checkpoints'} is complete, "
                "continue with resume=auto",
                file=sys.stderr,
                flush=True,
            )
        code = preemption.EXIT_CODE
    except _QuietExit as quiet:
        code = quiet.code
    except UserError as error:
        code = error.exit_code
        if env.rank == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
    except PipelineError as error:
        code = error.exit_code
        print(
            f"error: rank {env.rank}: {error}" if not str(error).startswith("rank") else f"error: {error}",
            file=sys.stderr,
            flush=True,
        )
    except BaseException as error:
        code = getattr(error, "exit_code", 1)
        message = f"rank {env.rank} failed: {type(error).__name__}: {error}"
        session.control.abort(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
    # A failed pipeline cannot be torn down politely (peers may be gone mid-transfer): leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
