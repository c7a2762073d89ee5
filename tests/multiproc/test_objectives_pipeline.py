"""Local objectives in the torchrun pipeline: InfoPro, whose image travels down with the batches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY, run_torchrun, train_here

from .records import assert_equal_shards, final_shards, step_losses

pytestmark = pytest.mark.multiproc


def test_infopro_pipeline_computes_exactly_what_one_process_computes(tmp_path: Path) -> None:
    # K=4 on 2 ranks of 2 modules: module 2 (rank 1) reconstructs the image, which rank 0 sends
    # after each training batch's activation; module 1 reads it inside rank 0.
    common = [*TINY, "model.num_modules=4", "objective.name=infopro", "pipeline.modules_per_rank=2"]
    train_here([*common, f"out_dir={tmp_path / 'single'}"])
    piped = run_torchrun(2, [*common, f"out_dir={tmp_path / 'pipe'}"])
    assert piped.returncode == 0, piped.stderr[-3000:]

    a, b = step_losses(tmp_path / "single"), step_losses(tmp_path / "pipe")
    assert len(a) == 4 * 10 and a == b  # every module, every step, bitwise
    assert_equal_shards(tmp_path / "single", tmp_path / "pipe", 4, parts=("body", "head", "aux"))
    assert "aux" in final_shards(tmp_path / "single", 4)[2]  # module 2's decoder was trained and saved

    summary = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    first, last = summary["ranks"]
    # 300 training images x 2 epochs, 1x28x28 float32 each, sent once from rank 0 to rank 1
    assert first["image_sent_bytes"] == 600 * 28 * 28 * 4
    assert last["image_sent_bytes"] is None  # the last rank sends nothing
    assert first["sent_bytes"] > 0


def test_auglocal_pipeline_computes_exactly_what_one_process_computes(tmp_path: Path) -> None:
    # K=2 on 2 ranks: module 0's classifier is built from the architecture of the later layers,
    # which rank 0 knows from the network's shapes, not from rank 1's blocks
    common = [*TINY, "model.num_modules=2", "objective.name=auglocal", "objective.kwargs={depth: 2}"]
    train_here([*common, f"out_dir={tmp_path / 'single'}"])
    piped = run_torchrun(2, [*common, f"out_dir={tmp_path / 'pipe'}"])
    assert piped.returncode == 0, piped.stderr[-3000:]
    a, b = step_losses(tmp_path / "single"), step_losses(tmp_path / "pipe")
    assert len(a) == 2 * 10 and a == b  # every module, every step, bitwise
    assert_equal_shards(tmp_path / "single", tmp_path / "pipe", 2)
    head = final_shards(tmp_path / "pipe", 2)[0]["head"]
    assert "0.branch.0.weight" in head and "1.branch.0.weight" in head  # two sampled blocks
    summary = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    assert summary["objective"] == "auglocal" and summary["method_label"] == "AugLocal (d=2, c=0.5)"
