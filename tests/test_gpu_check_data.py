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


def _config(name: str):
    steps, _ = gpu_check.throughput_steps(quick=False)
    model = gpu_check.throughput_models(quick=False)[name]
    return load_config(None, gpu_check.throughput_args(model, "cpu", steps)), steps


def test_the_gpu_modes_quickstart_throughput_data_holds_every_timed_step() -> None:
    # it asked for 15,360 training images of the embedded set, which holds 7,800 after validation
    cfg, steps = _config("quickstart")
    data = load_data(cfg.data, cfg.seed)
    assert (data.channels, data.image_size, data.num_classes) == (1, 28, 10)  # the quickstart's shape
    batches = Batches(data, cfg.data, cfg.seed)
    assert batches.steps_per_epoch >= steps and len(data.train) == cfg.data.batch_size * steps


def test_the_gpu_modes_resnet110_data_holds_every_timed_step() -> None:
    # 7,880 images of 3x96x96 are too large to draw in a unit test; synthetic data holds the
    # validation images out of data.train_size exactly as the quickstart case above shows
    cfg, steps = _config("resnet110_96px")
    assert cfg.data.name == "synthetic" and cfg.data.image_size == 96
    assert cfg.data.train_size - cfg.data.val_size >= cfg.data.batch_size * steps


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
    assert lines[-2] == "0 of 1 checks passed; skipped (need CUDA): nccl"
    assert "NCCL point-to-point between two GPUs" in lines[-1]
