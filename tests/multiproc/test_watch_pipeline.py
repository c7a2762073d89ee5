"""What researchers look at, from real torchrun pipelines: TensorBoard series and the timeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY, run_torchrun
from test_watch import assert_same, read_tensorboard

from trgl_pipe.metrics import read_metrics

pytestmark = pytest.mark.multiproc


def test_tensorboard_of_a_pipeline_equals_its_metrics(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    result = run_torchrun(2, [*TINY, f"out_dir={out}", "log.tensorboard=true"])
    assert result.returncode == 0, result.stderr
    found = read_tensorboard(out / "tensorboard")
    assert_same(found, read_metrics(out / "metrics.jsonl"))
    summary = json.loads((out / "summary.json").read_text())
    for figures in summary["ranks"]:
        r, first = figures["rank"], figures["modules"][0]
        steps = summary["modules"][first]["num_steps"]
        fraction = found[f"rank_{r}/input_wait_fraction"][steps]
        assert fraction == pytest.approx(figures["recv_wait_s"] / figures["elapsed_s"], rel=1e-5)
