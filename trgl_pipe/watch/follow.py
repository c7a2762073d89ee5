"""Follow a run as it trains: new lines of its metrics files and its progress board, into sinks.

Every rank already appends its events to ``metrics.jsonl`` / ``metrics.rank<r>.jsonl`` and
publishes its progress to the board (the torch.distributed store, or memory in one process). A
thread of the writing process reads both every few seconds and hands the points to the sinks
(TensorBoard, W&B). Only complete lines are read; a resumed run starts after what was there.
The metrics files must be on a filesystem the writing rank sees (as for their merge at the end).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

from trgl_pipe.config import Config
from trgl_pipe.watch.series import Point, SeriesBuilder, rank_points
from trgl_pipe.watch.sinks import Sink, open_sinks

POLL_S = 5.0


class _Tail:
    """The complete lines appended to one file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        events = []
        for line in data[:end].splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events


class RunWatch:
    """Feeds one run's sinks from its metrics files and board, in a thread, until :meth:`finish`."""

    def __init__(self, cfg: Config, sinks: list[Sink], world_size: int, poll_s: float = POLL_S) -> None:
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.sinks = sinks
        names = ["metrics.jsonl", *(f"metrics.rank{r}.jsonl" for r in range(1, world_size))]
        self._tails = [_Tail(self.out_dir / name) for name in names]
        self._builder = SeriesBuilder()
        self._board: Any = None
        self._ranks: dict[int, int] = {}  # rank -> its first module
        self._last_rank_step: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poll_s = poll_s
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="run-watch", daemon=True)
        self._thread.start()

    def attach_board(self, board: Any, first_module_of_rank: dict[int, int]) -> None:
        """Read per-rank progress from ``board`` (keys ``rank/<r>``) from now on."""
        self._board = board
        self._ranks = dict(first_module_of_rank)

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.poll()
            except Exception as error:  # watching must never take training down
                # said at finish(): a failing run's last words stay its own one line
                self._error = error
                return

    def poll(self) -> None:
        """Hand every new event and board snapshot to the sinks."""
        with self._lock:
            points: list[Point] = []
            for tail in self._tails:
                for event in tail.read():
                    points.extend(self._builder.from_event(event))
            # handed on before the board is read: the lines are consumed, and a failure below
            # (a snapshot mid-update) must not take them with it
            self._write(points)
            points = []
            if self._board is not None:
                snapshot = self._board.snapshot()
                for rank, module in self._ranks.items():
                    figures = snapshot.get(f"rank/{rank}")
                    if not figures:
                        continue
                    step = int(figures.get("step", self._builder.last_step.get(module, 0)))
                    if step > self._last_rank_step.get(rank, -1):
                        self._last_rank_step[rank] = step
                        points.extend(rank_points(rank, figures, step))
            self._write(points)

    def _write(self, points: list[Point]) -> None:
        if not points:
            return
        for sink in self.sinks:
            sink.scalars(points)
            sink.flush()

    def finish(self, summary: dict[str, Any] | None) -> None:
        """Read what is left, add each rank's final figures and the config with the final
        accuracies (when the run completed), and close the sinks."""
        self._stop.set()
        self._thread.join(timeout=30)
        if self._error is not None:
            print(f"[watch] stopped following the run early: {self._error}", file=sys.stderr, flush=True)
        self.poll()
        with self._lock:
            if summary is not None:
                points = []
                for figures in summary.get("ranks", []):
                    first = figures["modules"][0]
                    steps = {m["index"]: m.get("num_steps", 0) for m in summary.get("modules", [])}
                    points.extend(rank_points(int(figures.get("rank", 0)), figures, steps.get(first, 0)))
                self._write(points)
                results = {
                    key: summary[key]
                    for key in ("best_val_accuracy", "best_test_accuracy", "last_module_test_accuracy")
                    if summary.get(key) is not None
                }
                results["best_module"] = summary.get("best_module")
                for sink in self.sinks:
                    sink.hparams(self.cfg.to_dict(), results)
            for sink in self.sinks:
                sink.close()


def open_watch(cfg: Config, world_size: int = 1) -> RunWatch | None:
    """The run's watch, or None when neither TensorBoard nor W&B is asked for."""
    sinks = open_sinks(cfg)
    return RunWatch(cfg, sinks, world_size) if sinks else None
