"""What every run does around its training loop, in one order, for both programs.

    open:   the metrics log → the checkpoint writer → the workers → a checkpoint restored
    begin:  the folder's first files → the resume event → the watch sinks → the profiler
    end:    "end" (or "preempted") → the watch sinks → summary.json → replaced checkpoints go
            → the console

The one-process program (:mod:`trgl_pipe.training.single`) and the torchrun program
(:mod:`trgl_pipe.training.rank`) keep only what is theirs: links, handshakes, barriers and
gathering the ranks' results. A new sink or event is added here, once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trgl_pipe.config import Config
from trgl_pipe.context import RunContext
from trgl_pipe.folder.checkpoint import CheckpointWriter, Progress, log_resume, restore_workers
from trgl_pipe.folder.run_folder import RunFolder, discard_replaced
from trgl_pipe.runtime.clock import Clock
from trgl_pipe.stage import Stage
from trgl_pipe.training.worker import StageWorker, make_worker
from trgl_pipe.watch import open_watch
from trgl_pipe.watch.metrics import MetricsLogger
from trgl_pipe.watch.profile import profiler_for
from trgl_pipe.watch.summary import print_summary, write_summary


def metrics_path(out_dir: Path, rank: int) -> Path:
    """Rank 0 (and the one process) writes metrics.jsonl; the others their own file, merged at the end."""
    return out_dir / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl")


class RunSkeleton:
    """One run's (or one rank's) logger, checkpoint writer, workers, watch sinks and profiler.

    ``writes_checkpoints``: this process writes its modules' shards (one replica of each stage);
    ``shows``: it opens the watch sinks (TensorBoard, W&B) and prints the summary (rank 0).
    """

    def __init__(
        self,
        cfg: Config,
        ctx: RunContext,
        *,
        rank: int = 0,
        writes_checkpoints: bool = True,
        shows: bool = True,
    ) -> None:
        self.cfg, self.ctx, self.rank, self.shows = cfg, ctx, rank, shows
        self.out = Path(cfg.out_dir)
        self.logger = MetricsLogger(
            metrics_path(self.out, rank), start_time=ctx.start_time
        )  # opens at "start"
        self.writer: CheckpointWriter | None = None
        if writes_checkpoints:
            self.writer = CheckpointWriter(
                cfg,
                ctx.partition,
                cfg.train.regime,
                ctx.model_info(),
                ctx.steps_per_epoch,
                on_complete=lambda: discard_replaced(self.out),
            )
        self.workers: list[StageWorker] = []
        self.resume: Path | None = None
        self.progress: Progress | None = None
        self.watch: Any = None
        self.profiler: Any = None
        self.t0 = time.time()  # start() resets it; a run that fails before its loop still has a wall time

    def make_workers(
        self, stages: list[Stage], clock: Clock | None, log_fields: dict[str, Any] | None = None
    ) -> list[StageWorker]:
        """A worker per stage, logging to this run's metrics and checkpointing with its writer."""
        self.workers = [make_worker(s, self.cfg, self.logger, self.writer, clock, log_fields) for s in stages]
        return self.workers

    def restore(self, resume: Path | None, announce: bool = True) -> Progress | None:
        """Load the workers' shards from ``resume`` (writes nothing: :meth:`begin` logs it)."""
        self.resume = resume
        if resume is not None:
            self.progress = restore_workers(resume, self.workers, announce=announce)
        return self.progress

    def begin(self, folder: RunFolder | None, ranks: int = 1, **fields: Any) -> None:
        """Everything is checked: from here on the run writes (the folder's holder commits it).
        ``fields`` go into the "start" event; ``ranks``: how many the watch sinks will hear from."""
        if folder is not None:
            folder.begin(self.cfg, self.logger, self.ctx.partition, self.ctx.data.describe(), **fields)
        if self.progress is not None:
            assert self.resume is not None
            log_resume(self.logger, self.resume, self.workers, self.progress)
        self.watch = open_watch(self.cfg, ranks) if self.shows else None
        self.profiler = profiler_for(self.cfg, self.workers[0], f"rank{self.rank}")

    def start(self) -> None:
        """The training loop starts: the wall time counts from here."""
        self.t0 = time.time()

    @property
    def wall_time_s(self) -> float:
        return time.time() - self.t0

    def stop_profiler(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()

    def preempted(self, **fields: Any) -> None:
        """SIGTERM stopped the loop after a checkpoint: log it, close the log and the watch sinks."""
        self.logger.log("preempted", **fields)
        self.logger.close()
        if self.watch is not None:
            self.watch.finish(None)

    def ended(self, **fields: Any) -> None:
        """The loop ran to its end: log it and close the log (the summary comes next)."""
        self.logger.log("end", **fields)
        self.logger.close()

    def finish(
        self, summary: dict[str, Any], console: bool = True, before_write: Callable[[], None] | None = None
    ) -> None:
        """The summary goes to the watch sinks, then summary.json (the run's last file), then the
        replaced checkpoints go and the console gets the table. ``before_write``: what must land
        before summary.json (the other ranks' metrics)."""
        if self.watch is not None:
            self.watch.finish(summary)
        if before_write is not None:
            before_write()
        write_summary(self.out, summary)
        discard_replaced(self.out)
        if console:
            print_summary(summary)
