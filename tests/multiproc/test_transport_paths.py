"""Transport paths across real ranks (torchrun, gloo): empty evaluation shards, channels_last."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY, run_torchrun, train_here

from trgl_pipe.config import load_config
from trgl_pipe.stage import build_parts
from trgl_pipe.watch.metrics import read_metrics

pytestmark = pytest.mark.multiproc


def test_a_validation_split_of_one_image_over_two_replicas_trains_and_counts_exactly(tmp_path: Path) -> None:
    # replica 1 of each stage gets an empty shard of the only validation batch; the test split
    # (3 images in batches of 2) leaves it one empty shard too
    out = tmp_path / "run"
    args = [
        *TINY,
        "data.train_size=128",
        "data.val_size=1",
        "data.test_size=3",
        "data.eval_batch_size=2",
        "train.epochs=1",
        "pipeline.replicas=2",
        f"out_dir={out}",
    ]
    done = run_torchrun(4, args)
    assert done.returncode == 0, done.stderr[-3000:]
    evals = [e for e in read_metrics(out / "metrics.jsonl") if e["event"] == "eval"]
    assert len(evals) == 2 * 2 * 2  # modules × replicas × splits
    assert {e["count"] for e in evals if e["split"] == "val"} == {1}
    assert {e["count"] for e in evals if e["split"] == "test"} == {3}


def test_channels_last_bf16_wire_activations_cross_ranks_and_compute_what_one_process_computes(
    tmp_path: Path,
) -> None:
    # pipeline.wire_dtype=bf16: module 0's output is cast to bf16 for the wire and back to float32
    # on arrival, and travels as its NHWC view (no copy into NCHW and back); one process applies
    # the same casts, so the same bits arrive and every loss is equal
    common = [*TINY, "train.channels_last=true", "train.epochs=1", "pipeline.wire_dtype=bf16"]
    train_here([*common, f"out_dir={tmp_path / 'single'}"])
    piped = run_torchrun(2, [*common, f"out_dir={tmp_path / 'pipe'}"])
    assert piped.returncode == 0, piped.stderr[-3000:]

    def losses(out: Path) -> dict:
        events = read_metrics(out / "metrics.jsonl")
        return {(e["module"], e["step"]): e["loss"] for e in events if e["event"] == "train"}

    a, b = losses(tmp_path / "single"), losses(tmp_path / "pipe")
    assert len(a) == 2 * 5 and a == b
    # half the bytes: 2 per value of module 0's output, for every sample it passed on
    summary = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    cfg = load_config(None, [*common, f"out_dir={tmp_path / 'x'}"])
    parts = build_parts(cfg, (1, 28, 28), 10)
    values = math.prod(parts.shapes[summary["partition"][0][1] - 1])
    events = read_metrics(tmp_path / "pipe" / "metrics.jsonl")
    samples = summary["ranks"][0]["train_samples"] + sum(
        e["count"] for e in events if e["event"] == "eval" and e["module"] == 0
    )
    assert summary["ranks"][0]["sent_bytes"] == samples * values * 2
