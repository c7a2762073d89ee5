"""Where each rank's time goes, span by span: the raw material of ``python -m trgl_pipe.timeline``.

A rank's loop is cut into contiguous spans, each starting where the previous one ended: waiting
for input, then handling the message (compute for a training batch, evaluation, checkpoint, or
other for the markers of an epoch's end and of the stop), then waiting for room in the next
rank's buffer. The loop's own bookkeeping between messages (a progress sample every couple of
seconds) falls into the next input wait. One line per span, ``category<TAB>start<TAB>end`` in
CLOCK_MONOTONIC seconds, through a buffered file: a few microseconds per span (see
benchmarks/timeline_cost.py). A header line ``# {json}`` names the rank and maps the monotonic
clock to wall-clock time, so the spans of ranks on different hosts can be laid side by side.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from trgl_pipe.runtime.messages import Kind

CATEGORIES = ("input", "compute", "room", "evaluation", "checkpoint", "other")
CATEGORY_OF_KIND = {
    Kind.TRAIN: "compute",
    Kind.EVAL: "evaluation",
    Kind.EVAL_DONE: "evaluation",
    Kind.CHECKPOINT: "checkpoint",
    Kind.EPOCH_END: "other",
    Kind.STOP: "other",
}
BUFFER_BYTES = 1 << 16
FLUSH_S = 5.0


class SpanRecorder:
    """Contiguous spans of one worker (a rank, or a thread of the simulated pipeline)."""

    def __init__(self, path: Path | None, meta: dict[str, Any], append: bool = False) -> None:
        """``append``: a resumed run adds a segment to the file; a fresh run starts it anew."""
        self._file = None
        self._last = self._flushed = time.monotonic()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a" if append else "w", buffering=BUFFER_BYTES)  # noqa: SIM115 - kept open for the run
            self._meta = meta

    def start(self) -> None:
        """The first span starts now; the header ties this clock to wall time."""
        self._last = self._flushed = time.monotonic()
        if self._file is not None:
            header = {**self._meta, "monotonic": self._last, "wall": time.time()}
            self._file.write(f"# {json.dumps(header)}\n")

    def until(self, category: str) -> None:
        """Close the current span as ``category`` now; the next one starts here."""
        if self._file is None:
            return
        now = time.monotonic()
        self._file.write(f"{category}\t{self._last:.6f}\t{now:.6f}\n")
        self._last = now
        if now - self._flushed > FLUSH_S:  # a rank that fails or hangs keeps all but its last seconds
            self._file.flush()
            self._flushed = now

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_spans(path: Path) -> list[tuple[dict[str, Any], list[tuple[str, float, float]]]]:
    """The segments of a spans file (one per start: a resumed run adds one), spans in wall seconds."""
    segments: list[tuple[dict[str, Any], list[tuple[str, float, float]]]] = []
    offset = 0.0
    with open(path) as handle:
        for line in handle:
            if line.startswith("# "):
                meta = json.loads(line[2:])
                offset = meta["wall"] - meta["monotonic"]
                segments.append((meta, []))
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3 or not segments:
                continue  # a line cut short by a crash
            try:
                start, end = float(parts[1]) + offset, float(parts[2]) + offset
            except ValueError:
                continue
            segments[-1][1].append((parts[0], start, end))
    return segments
