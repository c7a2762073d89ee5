"""The timeline of a pipeline run: what every rank did, and when.

    python -m trgl_pipe.timeline RUN_DIR [--png [FILE]] [--window START_S LENGTH_S]

Reads the spans each rank recorded (``RUN_DIR/spans/rank<r>.tsv``, ``log.timeline: true``, the
default) and writes ``RUN_DIR/timeline.json``, a Chrome trace that Perfetto (ui.perfetto.dev) and
chrome://tracing open: one track per rank, its time cut into compute, waiting for input, waiting
for room in the next rank's buffer, evaluation, checkpoint and other (epoch and stop markers).
With ``--png`` it also draws a Gantt chart of a window of the run (matplotlib, the [report]
extra). Times are host times: on a GPU, compute is the time the host spent queueing the step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from trgl_pipe.errors import UserError
from trgl_pipe.io import atomic_write_text
from trgl_pipe.watch.spans import CATEGORIES, read_spans

COLORS = {
    "compute": "#2b8a3e",
    "input": "#f08c00",
    "room": "#c92a2a",
    "evaluation": "#1971c2",
    "checkpoint": "#7048e8",
    "other": "#868e96",
}
LABELS = {
    "compute": "compute",
    "input": "waiting for input",
    "room": "waiting for room",
    "evaluation": "evaluation",
    "checkpoint": "checkpoint",
    "other": "other",
}


def load_tracks(run_dir: Path) -> dict[int, tuple[dict[str, Any], list[tuple[str, float, float]]]]:
    """rank -> (its header, all its spans in wall seconds), from every spans file of the run."""
    folder = run_dir / "spans"
    files = sorted(folder.glob("rank*.tsv")) if folder.is_dir() else []
    if not files:
        raise UserError(
            f"{run_dir} holds no spans (spans/rank<r>.tsv): the timeline needs a pipeline run "
            "(torchrun, or pipeline.transport=sim) with log.timeline=true"
        )
    tracks = {}
    for path in files:
        segments = read_spans(path)
        if not segments:
            continue
        meta = segments[0][0]
        tracks[int(meta["rank"])] = (meta, [span for _, spans in segments for span in spans])
    return tracks


def chrome_trace(tracks: dict[int, tuple[dict[str, Any], list[tuple[str, float, float]]]]) -> dict[str, Any]:
    """Complete ("X") events in microseconds from the earliest span, one process per rank."""
    origin = min(spans[0][1] for _, spans in tracks.values() if spans)
    events: list[dict[str, Any]] = []
    for rank, (meta, spans) in sorted(tracks.items()):
        modules = meta.get("modules", [])
        name = f"rank {rank} (module{'s' if len(modules) > 1 else ''} {', '.join(map(str, modules))})"
        if meta.get("replica"):
            name += f" replica {meta['replica']}"
        events.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": name}})
        events.append(
            {"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}}
        )
        events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": 0, "args": {"name": "loop"}})
        for category, start, end in spans:
            events.append(
                {
                    "name": LABELS.get(category, category),
                    "cat": category,
                    "ph": "X",
                    "pid": rank,
                    "tid": 0,
                    "ts": round((start - origin) * 1e6, 3),
                    "dur": round((end - start) * 1e6, 3),
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"origin_wall_s": origin}}


def default_window(tracks: dict[int, tuple[dict[str, Any], list]]) -> tuple[float, float]:
    """About 12 training steps of the slowest rank, from the middle of the run (seconds from start)."""
    origin = min(spans[0][1] for _, spans in tracks.values() if spans)
    end = max(spans[-1][2] for _, spans in tracks.values() if spans)
    cycles = []
    for _, spans in tracks.values():
        starts = [s for c, s, _ in spans if c == "compute"]
        if len(starts) > 1:
            cycles.append(statistics.median(b - a for a, b in itertools.pairwise(starts)))
    length = 12 * max(cycles) if cycles else (end - origin)
    start = max(0.0, (end - origin) / 2 - length / 2)
    return start, min(length, end - origin - start)


def draw_gantt(
    tracks: dict[int, tuple[dict[str, Any], list]], path: Path, window: tuple[float, float], title: str
) -> None:
    """A Gantt chart of the window (start, length) in seconds from the run's start, one row per rank."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as error:
        raise UserError("--png needs matplotlib: pip install -e '.[report]'") from error
    origin = min(spans[0][1] for _, spans in tracks.values() if spans)
    lo, hi = window[0], window[0] + window[1]
    ranks = sorted(tracks)
    height = 1.2 + 0.4 * len(ranks)
    fig, ax = plt.subplots(figsize=(9, height), dpi=110)
    for row, rank in enumerate(ranks):
        by_category: dict[str, list[tuple[float, float]]] = {}
        for category, start, end in tracks[rank][1]:
            a, b = start - origin, end - origin
            if b < lo or a > hi:
                continue
            a, b = max(a, lo), min(b, hi)
            by_category.setdefault(category, []).append((a * 1e3, (b - a) * 1e3))
        for category, bars in by_category.items():
            ax.broken_barh(bars, (row - 0.4, 0.8), color=COLORS.get(category, "#000"), linewidth=0)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlim(lo * 1e3, hi * 1e3)
    ax.set_xlabel("ms since the start of training")
    ax.set_title(title, fontsize=9)
    fig.legend(
        handles=[Patch(color=COLORS[c], label=LABELS[c]) for c in CATEGORIES],
        ncol=6,
        fontsize=7,
        loc="lower center",
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trgl_pipe.timeline", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/timeline.json")
    parser.add_argument("--png", type=Path, nargs="?", const=True, default=None, help="also a Gantt chart")
    parser.add_argument(
        "--window", type=float, nargs=2, default=None, metavar=("START_S", "LENGTH_S"), help="of the chart"
    )
    args = parser.parse_args(argv)
    try:
        tracks = load_tracks(args.run_dir)
        trace = chrome_trace(tracks)
        out = args.out or args.run_dir / "timeline.json"
        atomic_write_text(out, json.dumps(trace))
        spans = sum(len(s) for _, s in tracks.values())
        print(f"{out}: {len(tracks)} tracks, {spans} spans (open it in ui.perfetto.dev)")
        if args.png is not None:
            png = args.run_dir / "timeline.png" if args.png is True else args.png
            window = tuple(args.window) if args.window else default_window(tracks)
            title = f"{args.run_dir.name}: {window[1]:.2f} s from {window[0]:.2f} s"
            draw_gantt(tracks, png, window, title)
            print(f"{png}: Gantt chart of {window[1]:.2f} s from {window[0]:.2f} s")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
