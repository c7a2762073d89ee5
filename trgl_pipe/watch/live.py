"""Live progress: workers publish small snapshots to a board; one thread on rank 0 shows them.

The view says where the run is (epoch e of E, steps done of all, elapsed, ETA), then one row per
module (rate, loss, τ/λ, kinetic energy, latest validation accuracy, buffer and waits), then the
devices (GPU utilisation, memory and power from NVML; CPU% and RSS on CPUs). On a terminal it is
a ``rich`` table redrawn every 2 s; otherwise (CI, Slurm logs) it is one compact block of text
every 30 s (``log.live_interval_s`` sets either). Publishing is rate-limited by the caller, so
the view costs the training loop one host sync per interval at most.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


class Board(Protocol):
    """Where workers leave their latest progress snapshot, under keys ``module/<k>`` and ``rank/<r>``."""

    def publish(self, key: str, snapshot: dict[str, Any]) -> None: ...

    def snapshot(self) -> dict[str, dict[str, Any]]: ...


class LocalBoard:
    """A board for workers that share one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, dict[str, Any]] = {}

    def publish(self, key: str, snapshot: dict[str, Any]) -> None:
        with self._lock:
            self._items[key] = dict(snapshot)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._items.items()}


class StoreBoard:
    """A board on a torch.distributed key-value store (one small key per module and per rank)."""

    def __init__(self, store: Any, keys: list[str]) -> None:
        self.store = store
        self.keys = keys

    def publish(self, key: str, snapshot: dict[str, Any]) -> None:
        self.store.set(f"live/{key}", json.dumps(snapshot))

    def snapshot(self) -> dict[str, dict[str, Any]]:
        items = {}
        for key in self.keys:
            if self.store.check([f"live/{key}"]):
                items[key] = json.loads(self.store.get(f"live/{key}"))
        return items


MODULE_COLUMNS = (
    ("module", "module", "{}"),
    ("epoch", "epoch", "{}"),
    ("step", "step", "{}"),
    ("samples_per_s", "samples/s", "{:.0f}"),
    ("loss", "loss", "{:.4f}"),
    ("weight", "τ / λ", "{}"),
    ("kinetic", "kinetic", "{:.3g}"),
    ("val_accuracy", "val acc %", "{:.2%}"),
    ("buffer", "buffer", "{:.2f}"),
    ("recv_wait_s", "recv wait s", "{:.1f}"),
    ("send_wait_s", "send wait s", "{:.1f}"),
)


def _cell(snapshot: dict[str, Any], key: str, fmt: str) -> str:
    value = snapshot.get(key)
    if value is None:
        return "-"
    try:
        text = fmt.format(value)
    except (ValueError, TypeError):
        return str(value)
    return text.rstrip("%") if fmt.endswith("%}") else text


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(modules: list[dict[str, Any]]) -> str:
    """Epoch e of E, steps done of all (the slowest module's), elapsed and ETA."""
    if not modules:
        return "starting"
    slowest = min(modules, key=lambda m: m.get("step", 0))
    done, total = slowest.get("step", 0), slowest.get("total_steps") or 0
    elapsed = max(m.get("elapsed_s") or 0.0 for m in modules)
    eta = elapsed * (total - done) / done if done and total else None
    epochs = slowest.get("epochs") or 0
    epoch = min(slowest.get("epoch", 0) + 1, epochs) if epochs else slowest.get("epoch", 0) + 1
    share = f" ({100 * done / total:.0f}%)" if total else ""
    return (
        f"epoch {epoch}/{epochs or '?'} · step {done}/{total or '?'}{share} · "
        f"{_clock(elapsed)} elapsed · ETA {_clock(eta)}"
    )


def device_text(rank: str, s: dict[str, Any]) -> str:
    """``rank 0 gpu sm 45% 12.3 GiB · device 97% 31.2/80.0 GiB 412 W`` (this rank's share, then
    the whole GPU, which ranks sharing it all see) or ``rank 0 cpu 180% 1.1 GiB``."""
    gib = 1024**3
    if s.get("gpu_device_util_percent") is not None:
        used, total = s.get("gpu_device_memory_used_bytes") or 0, s.get("gpu_memory_total_bytes") or 0
        power = f" {s['gpu_device_power_w']:.0f} W" if s.get("gpu_device_power_w") is not None else ""
        sm = s.get("gpu_process_sm_percent")
        mine = s.get("gpu_process_memory_bytes")
        own = f"sm {'?' if sm is None else f'{sm:.0f}%'} {'?' if mine is None else f'{mine / gib:.1f}'} GiB"
        device = f"device {s['gpu_device_util_percent']:.0f}% {used / gib:.1f}/{total / gib:.1f} GiB{power}"
        return f"rank {rank} gpu {own} · {device}"
    return f"rank {rank} cpu {s.get('cpu_percent', 0):.0f}% {s.get('rss_bytes', 0) / gib:.1f} GiB"


def _split(items: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, dict]]]:
    modules = sorted((v for k, v in items.items() if k.startswith("module/")), key=lambda m: m["module"])
    ranks = sorted(
        ((k.split("/", 1)[1], v) for k, v in items.items() if k.startswith("rank/")),
        key=lambda kv: int(kv[0]),
    )
    return modules, ranks


class LiveView:
    """Shows a board every ``interval_s`` seconds until stopped."""

    def __init__(
        self, board: Board, mode: str, interval_s: float | None, title: str, telemetry: Any = None
    ) -> None:
        """``telemetry``: sample this process's device into the board as ``rank/0`` (one process)."""
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.board = board
        self.mode = mode
        self.interval_s = interval_s or (2.0 if mode == "rich" else 30.0)
        self.title = title
        self.telemetry = telemetry
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LiveView:
        if self.mode != "off" or self.telemetry is not None:
            self._thread = threading.Thread(target=self._run, name="live-view", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _sample(self) -> None:
        if self.telemetry is not None:
            self.board.publish("rank/0", self.telemetry.sample())

    def _table(self) -> Group:
        self._sample()
        modules, ranks = _split(self.board.snapshot())
        table = Table(title=f"{self.title} · {progress_line(modules)}", expand=False)
        for _, header, _ in MODULE_COLUMNS:
            table.add_column(header, justify="right")
        for snap in modules:
            table.add_row(*(_cell(snap, key, fmt) for key, _, fmt in MODULE_COLUMNS))
        devices = Text(" · ".join(device_text(r, s) for r, s in ranks), style="dim")
        return Group(table, devices)

    def block(self) -> str:
        """The plain-text view: a progress line, one line per module, one line of devices."""
        self._sample()
        modules, ranks = _split(self.board.snapshot())
        lines = [f"[live] {self.title} · {progress_line(modules)}"]
        for snap in modules:
            parts = [f"{h}={_cell(snap, k, f)}" for k, h, f in MODULE_COLUMNS[1:] if snap.get(k) is not None]
            lines.append(f"[live]   module {snap['module']}: " + " ".join(parts))
        if ranks:
            lines.append("[live]   " + " · ".join(device_text(r, s) for r, s in ranks))
        return "\n".join(lines)

    def _run(self) -> None:
        try:
            if self.mode == "rich":
                with Live(self._table(), console=Console(), refresh_per_second=4, transient=True) as live:
                    while not self._stop.wait(self.interval_s):
                        live.update(self._table())
            elif self.mode == "off":  # no view: only the device samples for summary.json
                while not self._stop.wait(2.0):
                    self._sample()
            else:
                while not self._stop.wait(self.interval_s):
                    print(self.block(), flush=True)
        except Exception as error:  # the view must never take training down
            print(f"[live] view stopped: {error}", file=sys.stderr, flush=True)


class Publisher:
    """Rate-limited publishing of one worker's progress to a board."""

    def __init__(self, board: Board | None, key: str, interval_s: float | None) -> None:
        self.board = board
        self.key = key
        self.interval_s = min(interval_s or 2.0, 2.0)
        self._next = 0.0

    def due(self) -> bool:
        return self.board is not None and time.monotonic() >= self._next

    def publish(self, snapshot: dict[str, Any]) -> None:
        if self.board is None:
            return
        self._next = time.monotonic() + self.interval_s
        try:
            self.board.publish(self.key, snapshot)
        except Exception:  # a lost store connection shows up elsewhere, with a better message
            self.board = None
