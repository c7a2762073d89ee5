"""One process: every regime on one device, and the pipeline simulated with one thread per module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trgl_pipe.config import Config
from trgl_pipe.context import RunContext, build_context, configure_torch, resolve_device
from trgl_pipe.folder.checkpoint import find_resume
from trgl_pipe.folder.run_folder import RunFolder, claim
from trgl_pipe.runtime import preemption
from trgl_pipe.runtime.clock import Clock, clock_for
from trgl_pipe.training.loop import rank_stats
from trgl_pipe.training.regimes import run_regime
from trgl_pipe.training.skeleton import RunSkeleton
from trgl_pipe.training.worker import StageWorker
from trgl_pipe.watch.live import LiveView, LocalBoard, Publisher
from trgl_pipe.watch.summary import build_summary
from trgl_pipe.watch.telemetry import Telemetry


class Preempted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint."""

    exit_code = preemption.EXIT_CODE


def _process_report(
    ctx: RunContext, workers: list[StageWorker], clock: Clock, telemetry: Telemetry
) -> dict[str, Any]:
    return {**rank_stats(workers, None, None, clock, ctx.device, 0), **telemetry.summary()}


def run_single(cfg: Config, console_summary: bool = True) -> dict[str, Any]:
    """Train in this process as ``cfg`` says; write and return the summary."""
    configure_torch(cfg)
    device = resolve_device(cfg.device)
    with claim(cfg) as folder:
        return _run(cfg, folder, device, console_summary)


def _run(cfg: Config, folder: RunFolder, device: torch.device, console_summary: bool) -> dict[str, Any]:
    ctx = build_context(cfg, device)
    run = RunSkeleton(cfg, ctx)
    stages = [ctx.build_stage(i) for i in range(ctx.num_modules)]
    simulated = cfg.pipeline.transport == "sim"
    clock = clock_for(device)  # one process: one clock for all modules (sim: one per thread)
    workers = run.make_workers(stages, None if simulated else clock)
    if cfg.train.regime in ("ddg", "fr"):  # before a resume: the shards carry the work in flight
        from trgl_pipe.training.delayed import attach, delays_for

        attach(workers, cfg.train.regime, delays_for(cfg, len(workers)))
    telemetry = Telemetry(device)
    progress = run.restore(find_resume(cfg, ctx.partition, cfg.train.regime, ctx.steps_per_epoch))
    run.begin(folder, device=str(device))
    print(f"data: {ctx.data.describe()}", flush=True)
    print(
        f"modules: {ctx.num_modules} · blocks per module {[b - a for a, b in ctx.partition]} · "
        f"device {device}",
        flush=True,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    preemption.install()
    run.start()
    if simulated:
        from trgl_pipe.training.sim import run_simulated

        ranks = run_simulated(ctx, workers, progress, preemption.requested, telemetry)
        transport = "sim"
    else:
        board = LocalBoard()
        if run.watch is not None:
            run.watch.attach_board(board, {0: 0})
        publishers = [Publisher(board, f"module/{w.index}", cfg.log.live_interval_s) for w in workers]
        title = f"trgl_pipe · {cfg.train.regime}"
        with LiveView(board, cfg.log.live, cfg.log.live_interval_s, title, telemetry):
            run_regime(ctx, workers, publishers, progress, preemption.requested, run.writer)
        clock.settle()
        ranks = [_process_report(ctx, workers, clock, telemetry)]
        transport = "none"
    wall = run.wall_time_s
    run.stop_profiler()
    if preemption.requested():
        run.preempted(wall_time_s=wall)
        raise Preempted(
            f"stopped by SIGTERM after a checkpoint in {Path(cfg.out_dir) / 'checkpoints'}; "
            "continue with resume=auto"
        )
    summary = build_summary(
        cfg, [w.report() for w in workers], ranks, wall, ctx.data, ctx.partition, transport, 1
    )
    run.ended(wall_time_s=wall, best_module=summary["best_module"])
    run.finish(summary, console=console_summary)
    return summary
