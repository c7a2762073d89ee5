"""The GPU acceptance script's own logic, fast, on CPU: its data at the GPU mode's sizes and its
step comparison. (test_gpu_check.py runs the whole script in its CPU mode.)"""

from __future__ import annotations

import math
import sys

import pytest
from conftest import ROOT

from trgl_pipe.config import load_config
from trgl_pipe.data import Batches, load_data

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check


def test_the_gpu_modes_throughput_data_holds_every_timed_step() -> None:
    # it once asked for more training images than the embedded set holds; synthetic data holds
    # the validation images out of data.train_size (drawn here at 8x8: the count is the same)
    steps, _ = gpu_check.throughput_steps(quick=False)
    model = gpu_check.throughput_models(quick=False)["resnet110_96px"]
    args = gpu_check.throughput_args(model, "cpu", steps)
    cfg = load_config(None, args)
    assert cfg.data.name == "synthetic" and cfg.data.image_size == 96
    small = load_config(None, [*args, "data.image_size=8"])
    data = load_data(small.data, small.seed)
    batches = Batches(data, small.data, small.seed)
    assert batches.steps_per_epoch >= steps and len(data.train) == small.data.batch_size * steps


def test_a_nan_or_a_missing_step_fails_the_comparison() -> None:
    a = {(0, 1): (1.0, 2.0, 3.0), (0, 2): (1.0, 2.0, 3.0), (1, 1): (0.5, 0.5, 0.5)}
    b = {(0, 1): (1.0, float("nan"), 3.0), (0, 2): (1.0, 2.5, 3.0)}
    compared = gpu_check.compare_steps(a, b)
    assert math.isnan(compared["largest"])  # max() would have said 0.5
    assert compared["num_missing"] == 1 and compared["missing_steps"] == [[1, 1]]
    same = gpu_check.compare_steps(a, dict(a))
    assert same["largest"] == 0.0 and same["num_missing"] == 0


@pytest.mark.parametrize("results", [[{"check": "nccl", "ok": None, "seconds": 0.0, "skipped": "x"}]])
def test_the_verdict_says_what_was_skipped_and_what_one_gpu_cannot_test(results) -> None:
    lines = gpu_check.verdict(results)
    assert lines[-2] == "0 of 1 checks passed; skipped: nccl"
    assert "NCCL point-to-point between two GPUs" in lines[-1]


def test_the_default_gpu_run_is_planned_within_the_lent_time() -> None:
    # one H100, 15 minutes lent including start-up: the whole run <= 7 min, each group <= 5 min
    # (estimates from launches, steps and compiles: see gpu_check.PROCESS_S)
    one_gpu = [s for s in gpu_check.SPECS if "two_gpus" not in s.needs]
    assert sum(s.gpu_s for s in one_gpu) <= 7 * 60
    for group in gpu_check.GROUPS:
        assert sum(s.gpu_s for s in gpu_check.SPECS if s.group == group) <= 5 * 60, group


def test_only_takes_checks_and_groups_and_names_the_known_ones() -> None:
    assert [s.name for s in gpu_check.select(["memory", "sigkill"])] == ["sigkill", "memory"]
    assert [s.name for s in gpu_check.select(["speed"])] == ["throughput", "speed_options"]
    assert len(gpu_check.select(None)) == len(gpu_check.SPECS)
    with pytest.raises(ValueError, match=r"--only speeed: not a check or group; groups: correctness"):
        gpu_check.select(["speeed"])


def test_the_plan_says_what_is_skipped_and_why(monkeypatch) -> None:
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    missing = gpu_check.preflight("cpu")
    assert missing["compiler"] == "no C compiler: torch.compile cannot build kernels"
    assert missing["cuda"] == "needs a CUDA GPU" and missing["two_gpus"]
    lines = gpu_check.plan_lines(gpu_check.select(["cuda", "memory"]), "cpu", True, missing)
    assert [line.split()[:3] for line in lines[:-1]] == [
        ["memory", "memory", "~12"],
        ["cuda", "nccl", "skipped:"],
        ["cuda", "host_syncs", "skipped:"],
    ]
    assert lines[1].endswith("skipped: needs a CUDA GPU")
    assert lines[-1] == "  total about 0.2 min (measured on a 2-core CPU)"
