"""One process: every regime on one device, and the pipeline simulated with one thread per module."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from trgl_pipe.checkpoint import CheckpointWriter, find_resume, log_resume, restore_workers
from trgl_pipe.config import Config
from trgl_pipe.context import RunContext, build_context, configure_torch, resolve_device
from trgl_pipe.live import LiveView, LocalBoard, Publisher
from trgl_pipe.metrics import MetricsLogger
from trgl_pipe.regimes import run_regime
from trgl_pipe.run_folder import RunFolder, claim, discard_replaced
from trgl_pipe.runtime import preemption
from trgl_pipe.runtime.clock import Clock, clock_for
from trgl_pipe.runtime.loop import rank_stats
from trgl_pipe.runtime.worker import StageWorker, make_worker
from trgl_pipe.summary import build_summary, print_summary, write_summary
from trgl_pipe.telemetry import Telemetry
from trgl_pipe.watch import open_watch
from trgl_pipe.watch.profile import profiler_for


class Preempted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint."""

    exit_code = preemption.EXIT_CODE


def _process_report(
    ctx: RunContext, workers: list[StageWorker], clock: Clock, telemetry: Telemetry
) -> dict[str, Any]:
    return {**rank_stats(workers, None, clock, ctx.device, 0), **telemetry.summary()}


def run_single(cfg: Config, console_summary: bool = True) -> dict[str, Any]:
    """Train in this process as ``cfg`` says; write and return the summary."""
    configure_torch(cfg)
    device = resolve_device(cfg.device)
    with claim(cfg) as folder:
        return _run(cfg, folder, device, console_summary)


def _run(cfg: Config, folder: RunFolder, device: torch.device, console_summary: bool) -> dict[str, Any]:
    out = folder.out
    ctx = build_context(cfg, device)
    logger = MetricsLogger(out / "metrics.jsonl", start_time=ctx.start_time)  # the file opens at "start"
    writer = CheckpointWriter(
        cfg,
        ctx.partition,
        cfg.train.regime,
        ctx.model_info(),
        ctx.steps_per_epoch,
        on_complete=lambda: discard_replaced(out),
    )
    stages = [ctx.build_stage(i) for i in range(ctx.num_modules)]
    simulated = cfg.pipeline.transport == "sim"
    clock = clock_for(device)  # one process: one clock for all modules (sim: one per thread)
    workers = [make_worker(s, cfg, logger, writer, None if simulated else clock) for s in stages]
    if cfg.train.regime in ("ddg", "fr"):  # before a resume: the shards carry the work in flight
        from trgl_pipe.delayed import attach, delays_for

        attach(workers, cfg.train.regime, delays_for(cfg, len(workers)))
    telemetry = Telemetry(device)
    resume = find_resume(cfg, ctx.partition, cfg.train.regime, ctx.steps_per_epoch)
    progress = restore_workers(resume, workers) if resume is not None else None
    # everything is checked: from here on the run writes
    folder.begin(cfg, logger, ctx, device=str(device))
    if progress is not None:
        log_resume(logger, resume, workers, progress)
    watch = open_watch(cfg)
    profiler = profiler_for(cfg, workers[0], "rank0")
    print(f"data: {ctx.data.describe()}", flush=True)
    print(
        f"modules: {ctx.num_modules} · blocks per module {[b - a for a, b in ctx.partition]} · "
        f"device {device}",
        flush=True,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    preemption.install()
    t0 = time.time()
    if simulated:
        from trgl_pipe.runtime.sim import run_simulated

        ranks = run_simulated(ctx, workers, progress, preemption.requested, telemetry)
        transport = "sim"
    else:
        board = LocalBoard()
        if watch is not None:
            watch.attach_board(board, {0: 0})
        publishers = [Publisher(board, f"module/{w.index}", cfg.log.live_interval_s) for w in workers]
        title = f"trgl_pipe · {cfg.train.regime}"
        with LiveView(board, cfg.log.live, cfg.log.live_interval_s, title, telemetry):
            run_regime(ctx, workers, publishers, progress, preemption.requested, writer)
        clock.settle()
        ranks = [_process_report(ctx, workers, clock, telemetry)]
        transport = "none"
    wall = time.time() - t0
    if profiler is not None:
        profiler.stop()
    if preemption.requested():
        logger.log("preempted", wall_time_s=wall)
        logger.close()
        if watch is not None:
            watch.finish(None)
        raise Preempted(
            f"stopped by SIGTERM after a checkpoint in {Path(cfg.out_dir) / 'checkpoints'}; "
            "continue with resume=auto"
        )
    summary = build_summary(
        cfg, [w.report() for w in workers], ranks, wall, ctx.data, ctx.partition, transport, 1
    )
    logger.log("end", wall_time_s=wall, best_module=summary["best_module"])
    logger.close()
    if watch is not None:
        watch.finish(summary)
    write_summary(Path(out), summary)
    discard_replaced(out)
    if console_summary:
        print_summary(summary)
    return summary
