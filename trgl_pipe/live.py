"""Live progress: workers publish small snapshots to a board; one thread on rank 0 shows them.

On a terminal the view is a ``rich`` table (one row per module); otherwise (CI, Slurm logs) it is
a plain line per module every ``log.live_interval_s`` seconds. Publishing is rate-limited by the
caller, so the view costs the training loop one host sync per interval at most.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Protocol

from rich.console import Console
from rich.live import Live
from rich.table import Table


class Board(Protocol):
    """Where workers leave their latest progress snapshot."""

    def publish(self, worker: int, snapshot: dict[str, Any]) -> None: ...

    def snapshot(self) -> dict[int, dict[str, Any]]: ...


class LocalBoard:
    """A board for workers that share one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[int, dict[str, Any]] = {}

    def publish(self, worker: int, snapshot: dict[str, Any]) -> None:
        with self._lock:
            self._items[worker] = dict(snapshot)

    def snapshot(self) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._items.items()}


class StoreBoard:
    """A board on a torch.distributed key-value store (one small key per rank)."""

    def __init__(self, store: Any, num_workers: int) -> None:
        self.store = store
        self.num_workers = num_workers

    def publish(self, worker: int, snapshot: dict[str, Any]) -> None:
        self.store.set(f"live/{worker}", json.dumps(snapshot))

    def snapshot(self) -> dict[int, dict[str, Any]]:
        items = {}
        for worker in range(self.num_workers):
            key = f"live/{worker}"
            if self.store.check([key]):
                items[worker] = json.loads(self.store.get(key))
        return items


COLUMNS = (
    ("module", "module", "{}"),
    ("epoch", "epoch", "{}"),
    ("step", "step", "{}"),
    ("samples_per_s", "samples/s", "{:.0f}"),
    ("loss", "loss", "{:.4f}"),
    ("weight", "τ / λ", "{}"),
    ("kinetic", "kinetic", "{:.3g}"),
    ("buffer", "buffer", "{:.2f}"),
    ("recv_wait_s", "recv wait s", "{:.1f}"),
    ("send_wait_s", "send wait s", "{:.1f}"),
)


def _cell(snapshot: dict[str, Any], key: str, fmt: str) -> str:
    value = snapshot.get(key)
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


class LiveView:
    """Shows a board every ``interval_s`` seconds until stopped."""

    def __init__(self, board: Board, mode: str, interval_s: float, title: str) -> None:
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.board = board
        self.mode = mode
        self.interval_s = interval_s
        self.title = title
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LiveView:
        if self.mode != "off":
            self._thread = threading.Thread(target=self._run, name="live-view", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _table(self) -> Table:
        table = Table(title=self.title, expand=False)
        for _, header, _ in COLUMNS:
            table.add_column(header, justify="right")
        for _, snap in sorted(self.board.snapshot().items()):
            table.add_row(*(_cell(snap, key, fmt) for key, _, fmt in COLUMNS))
        return table

    def _run(self) -> None:
        try:
            if self.mode == "rich":
                with Live(self._table(), console=Console(), refresh_per_second=4, transient=True) as live:
                    while not self._stop.wait(self.interval_s):
                        live.update(self._table())
            else:
                while not self._stop.wait(self.interval_s):
                    for _, snap in sorted(self.board.snapshot().items()):
                        parts = [f"{h}={_cell(snap, k, f)}" for k, h, f in COLUMNS if snap.get(k) is not None]
                        print("[live] " + " ".join(parts), flush=True)
        except Exception as error:  # the view must never take training down
            print(f"[live] view stopped: {error}", file=sys.stderr, flush=True)


class Publisher:
    """Rate-limited publishing of one worker's progress to a board."""

    def __init__(self, board: Board | None, worker: int, interval_s: float) -> None:
        self.board = board
        self.worker = worker
        self.interval_s = interval_s
        self._next = 0.0

    def due(self) -> bool:
        return self.board is not None and time.monotonic() >= self._next

    def publish(self, snapshot: dict[str, Any]) -> None:
        if self.board is None:
            return
        self._next = time.monotonic() + self.interval_s
        try:
            self.board.publish(self.worker, snapshot)
        except Exception:  # a lost store connection shows up elsewhere, with a better message
            self.board = None
