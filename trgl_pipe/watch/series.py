"""Events of metrics.jsonl and progress snapshots as scalar series keyed by a module's global step.

Pure: no file, no thread. The tag of a module's series is ``module_<k>/<name>``, of a rank's
``rank_<r>/<name>``; the step is the module's training steps so far (a rank's: its first
module's), so the curves of a pipeline run and of a one-process run of the same config lie on
each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TRAIN_FIELDS = ("loss", "ce", "kinetic", "accuracy", "lr", "tau", "lambda")
TRAIN_TAGS = {"accuracy": "train_accuracy"}  # the accuracy on the training batches
EVAL_FIELDS = ("accuracy", "ce", "kinetic_energy")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Point:
    tag: str
    value: float
    step: int


@dataclass
class SeriesBuilder:
    """Turns events into points; remembers each module's latest step for events without one."""

    last_step: dict[int, int] = field(default_factory=dict)

    def from_event(self, event: dict[str, Any]) -> list[Point]:
        kind = event.get("event")
        module = event.get("module")
        if module is None or kind not in ("train", "eval", "epoch_end"):
            return []
        replica = event.get("replica", 0)
        if "step" in event:
            self.last_step[module] = max(self.last_step.get(module, 0), int(event["step"]))
        step = int(event.get("step", self.last_step.get(module, 0)))
        if kind == "train":
            prefix = f"module_{module}" + (f"/replica_{replica}" if replica else "")
            return [
                Point(f"{prefix}/{TRAIN_TAGS.get(n, n)}", float(event[n]), step)
                for n in TRAIN_FIELDS
                if _number(event.get(n))
            ]
        if kind == "eval" and not replica:  # replicas log the same reduced figures
            split = event.get("split", "val")
            return [
                Point(f"module_{module}/{split}_{n}", float(event[n]), step)
                for n in EVAL_FIELDS
                if _number(event.get(n))
            ]
        return []


def rank_points(rank: int, figures: dict[str, Any], step: int) -> list[Point]:
    """Samples/s, the compute / input-wait / room-wait fractions of elapsed time, memory, GPU."""
    points = []
    elapsed = figures.get("elapsed_s") or 0.0
    if elapsed > 0:
        if figures.get("train_samples") is not None:
            points.append(Point(f"rank_{rank}/samples_per_s", figures["train_samples"] / elapsed, step))
        for key, name in (
            ("compute_s", "compute"),
            ("recv_wait_s", "input_wait"),
            ("send_wait_s", "room_wait"),
        ):
            if figures.get(key) is not None:
                points.append(Point(f"rank_{rank}/{name}_fraction", figures[key] / elapsed, step))
    for key in (
        "rss_bytes",
        "peak_memory_bytes",
        "gpu_memory_used_bytes",
        "gpu_util_percent",
        "gpu_power_w",
        "cpu_percent",
    ):
        value = figures.get(key)
        if _number(value):
            points.append(Point(f"rank_{rank}/{key}", float(value), step))
    return points
