"""What a module needs from the next one, in the torchrun pipeline: MAN's weights (module k+1's
first block every N steps) and HPFF's gradients (one step late), over the link back across ranks
and directly inside a rank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY, run_torchrun, train_here

from .records import assert_equal_shards, step_losses

pytestmark = pytest.mark.multiproc


def _pipeline_equals_one_process(tmp_path: Path, overrides: list[str]) -> dict:
    """K=4 on 2 ranks of 2 modules against one process: every module's loss at every step and
    every weight (the objectives' networks too) bit for bit; returns the pipeline's summary."""
    common = [*TINY, "model.num_modules=4", "pipeline.modules_per_rank=2", *overrides]
    train_here([*common, f"out_dir={tmp_path / 'single'}"])
    piped = run_torchrun(2, [*common, f"out_dir={tmp_path / 'pipe'}"])
    assert piped.returncode == 0, piped.stderr[-3000:]
    a, b = step_losses(tmp_path / "single"), step_losses(tmp_path / "pipe")
    assert len(a) == 4 * 10 and a == b
    assert_equal_shards(tmp_path / "single", tmp_path / "pipe", 4, parts=("body", "head", "aux"))
    return json.loads((tmp_path / "pipe" / "summary.json").read_text())


def test_man_pipeline_computes_exactly_what_one_process_computes(tmp_path: Path) -> None:
    # module 2 sends its first block to module 1 over the link back (rank 1 -> rank 0), modules 1
    # and 3 send theirs inside their rank; N=2 steps apart. The averages (aux) equal too: each
    # module took the same weights at the same steps
    man = ["objective.name=man", "objective.kwargs={every: 2, momentum: 0.9}"]
    summary = _pipeline_equals_one_process(tmp_path, man)
    assert summary["objective"] == "man" and summary["method_label"] == "MAN (m=0.9, N=2)"


def test_hpff_pipeline_computes_exactly_what_one_process_computes(tmp_path: Path) -> None:
    # module 2 sends its cascade gradient to module 1 over the link back (rank 1 -> rank 0),
    # modules 1 and 3 send theirs inside their rank. Module 2 is K-2: the authors' weights give
    # its cascade 0 there (nothing would cross ranks), so give it some
    hpff = ["objective.name=hpff", "objective.kwargs={weights: [5, 0.5, 1, 0.5]}"]
    assert _pipeline_equals_one_process(tmp_path, hpff)["objective"] == "hpff"
