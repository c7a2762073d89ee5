"""What researchers look at, from real torchrun pipelines: TensorBoard series and the timeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import itertools

from conftest import TINY, run_torchrun, train_here
from test_watch import assert_same, profiler_traces, read_tensorboard

from trgl_pipe.watch.metrics import read_metrics

pytestmark = pytest.mark.multiproc


def test_tensorboard_profiler_and_timeline_of_a_pipeline(tmp_path: Path) -> None:
    # one 2-rank run shows all three (a torchrun start fewer than a run each)
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    result = run_torchrun(2, [*TINY, f"out_dir={out}", "log.tensorboard=true", "debug.profile_steps=[3,4]"])
    assert result.returncode == 0, result.stderr
    found = read_tensorboard(out / "tensorboard")
    assert_same(found, read_metrics(out / "metrics.jsonl"))
    summary = json.loads((out / "summary.json").read_text())
    for figures in summary["ranks"]:
        r, first = figures["rank"], figures["modules"][0]
        steps = summary["modules"][first]["num_steps"]
        fraction = found[f"rank_{r}/input_wait_fraction"][steps]
        assert fraction == pytest.approx(figures["recv_wait_s"] / figures["elapsed_s"], rel=1e-5)
    # the same config in one process: its module curves lie on the pipeline's, step for step
    one = tmp_path / "one"
    train_here([*TINY, f"out_dir={one}", "log.tensorboard=true"])
    single = read_tensorboard(one / "tensorboard")
    modules = sorted(t for t in found if t.startswith("module_"))
    assert modules == sorted(t for t in single if t.startswith("module_"))
    for tag in modules:
        assert single[tag] == pytest.approx(found[tag], rel=1e-6), tag
    # debug.profile_steps: one torch.profiler trace per rank, with the two steps marked
    traces = profiler_traces(out)
    assert sorted(traces) == ["rank0", "rank1"]
    for trace in traces.values():
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {n for n in names if str(n).startswith("ProfilerStep#")} == {
            "ProfilerStep#3",
            "ProfilerStep#4",
        }
    _check_timeline(out, tmp_path, ranks=2)


def _check_timeline(out: Path, tmp_path: Path, ranks: int) -> None:
    """The run's timeline: one track per rank, contiguous, covering its wall time."""
    from trgl_pipe.timeline import main as timeline

    assert timeline([str(out), "--png"]) == 0
    trace = json.loads((out / "timeline.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == set(range(ranks))
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {f"rank {r} (module {r})" for r in range(ranks)}
    summary = json.loads((out / "summary.json").read_text())
    for figures in summary["ranks"]:
        track = sorted((e for e in spans if e["pid"] == figures["rank"]), key=lambda e: e["ts"])
        for before, after in itertools.pairwise(track):  # contiguous: no gap, no overlap
            assert after["ts"] == pytest.approx(before["ts"] + before["dur"], abs=2.0)
        covered_s = sum(e["dur"] for e in track) / 1e6
        # from the first batch to the stop: at least the rank's elapsed time, at most the run's
        assert figures["elapsed_s"] * 0.99 <= covered_s <= summary["wall_time_s"] + 0.5
        by_kind = {c: sum(e["dur"] for e in track if e["cat"] == c) / 1e6 for c in ("compute", "evaluation")}
        # a compute span holds the training step the clock times, and the step's logging around it
        assert figures["train_compute_s"] - 1e-3 <= by_kind["compute"] <= figures["elapsed_s"]
        assert {e["cat"] for e in track} >= {"input", "compute", "evaluation", "checkpoint"}
        assert ("room" in {e["cat"] for e in track}) == (
            figures["rank"] < ranks - 1
        )  # the last sends nothing
    assert (out / "timeline.png").stat().st_size > 5000
    # the report draws the same chart for a window of steps
    from trgl_pipe.report import build_report

    report = build_report([out], tmp_path / "report", "t").read_text()
    assert "](timeline_" in report
    assert next((tmp_path / "report").glob("timeline_*.png")).stat().st_size > 5000
