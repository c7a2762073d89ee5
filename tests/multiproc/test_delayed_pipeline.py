"""DDG and Features Replay across torchrun ranks (gloo, CPU): the backward link carries each
gradient to the rank before, and the pipeline computes bit for bit what one process computes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY, run_torchrun

from trgl_pipe.checkpoint import latest_complete
from trgl_pipe.config import load_config
from trgl_pipe.metrics import read_metrics
from trgl_pipe.single import run_single

pytestmark = pytest.mark.multiproc


def _common(k: int, regime: str) -> list[str]:
    return [
        *TINY,
        f"model.num_modules={k}",
        f"train.regime={regime}",
        "trgl.enabled=false",
        "optim.lr=0.2",
        "pipeline.buffer_size=2",
    ]


def _shards(out: Path, k: int) -> list[dict]:
    folder = latest_complete(out)
    return [torch.load(folder / f"module-{i}.pt", weights_only=True) for i in range(k)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    for i, (sa, sb) in enumerate(zip(a, b, strict=True)):
        for part in ("body", "head"):
            for name, tensor in sa["stage"][part].items():
                assert torch.equal(tensor, sb["stage"][part][name]), (i, part, name)
        assert sa["stage"]["num_steps"] == sb["stage"]["num_steps"]
        pa, pb = sa["carry"]["pending"], sb["carry"]["pending"]  # the batches still in flight
        assert [p["step"] for p in pa] == [p["step"] for p in pb]
        assert all(torch.equal(x["x"], y["x"]) for x, y in zip(pa, pb, strict=True))
        ga, gb = sa["carry"]["grads"], sb["carry"]["grads"]  # gradients sent, not yet applied
        assert [g[0] for g in ga] == [g[0] for g in gb]
        assert all(torch.equal(x[1], y[1]) for x, y in zip(ga, gb, strict=True))


def _losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_metrics(out / "metrics.jsonl") if e["event"] == "train"}


@pytest.mark.parametrize(
    ("k", "regime", "per_rank"),
    [(2, "ddg", 1), (4, "fr", 1), (4, "ddg", 2)],
    ids=["K2-ddg", "K4-fr", "K4-ddg-two-modules-per-rank"],
)
def test_delayed_pipeline_computes_exactly_what_one_process_computes(
    tmp_path: Path, k: int, regime: str, per_rank: int
) -> None:
    common = _common(k, regime)
    run_single(load_config(None, [*common, f"out_dir={tmp_path / 'single'}"]), console_summary=False)
    layout = f"pipeline.modules_per_rank={per_rank}"
    piped = run_torchrun(k // per_rank, [*common, f"out_dir={tmp_path / 'pipe'}", layout])
    assert piped.returncode == 0, piped.stderr[-3000:]
    a, b = _shards(tmp_path / "single", k), _shards(tmp_path / "pipe", k)
    assert [len(s["carry"]["pending"]) for s in a] == list(range(k - 1, -1, -1))  # module i lags K-1-i
    _assert_same(a, b)
    losses = _losses(tmp_path / "single")
    assert len(losses) == 10 and losses == _losses(tmp_path / "pipe")  # the last module, every step
    _assert_gradient_bytes(tmp_path / "pipe", k, per_rank)


# bytes of one sample of module m's input at TINY's depth and width (its ∂loss/∂input, float32)
INPUT_SAMPLE_BYTES = {
    (2, 1): 8 * 14 * 14 * 4,
    (4, 1): 4 * 28 * 28 * 4,
    (4, 2): 4 * 28 * 28 * 4,
    (4, 3): 8 * 14 * 14 * 4,
}


def _assert_gradient_bytes(out: Path, k: int, per_rank: int) -> None:
    """Each rank but the first sends back one gradient per update of its first module: of the
    batches 0 .. 9 - delay (TINY: 300 images a batch of 64 at a time, 2 epochs)."""
    sizes = [64, 64, 64, 64, 44] * 2
    ranks = sorted(json.loads((out / "summary.json").read_text())["ranks"], key=lambda r: r["rank"])
    assert ranks[0]["grad_sent_bytes"] is None  # the first rank has no one to send to
    for r in ranks[1:]:
        m = r["rank"] * per_rank
        delay = k - 1 - m
        expected = sum(sizes[: 10 - delay]) * INPUT_SAMPLE_BYTES[(k, m)]
        assert r["grad_sent_bytes"] == expected, (r["rank"], r["grad_sent_bytes"], expected)


def test_a_pipeline_resumes_a_one_process_checkpoint_with_batches_in_flight(tmp_path: Path) -> None:
    common = [*_common(2, "ddg"), "checkpoint.every_steps=3", "checkpoint.keep=100"]
    run_single(load_config(None, [*common, f"out_dir={tmp_path / 'single'}"]), console_summary=False)
    source = tmp_path / "single" / "checkpoints" / "0000000003"
    piped = run_torchrun(2, [*common, f"out_dir={tmp_path / 'pipe'}", f"resume={source}"])
    assert piped.returncode == 0, piped.stderr[-3000:]
    _assert_same(_shards(tmp_path / "single", 2), _shards(tmp_path / "pipe", 2))


def test_a_rank_waiting_for_a_gradient_names_the_hung_rank_within_the_timeout(tmp_path: Path) -> None:
    # rank 1 sleeps in its first step: rank 0 has sent batch 0 and waits for its gradient at step 1
    args = [*_common(2, "ddg"), f"out_dir={tmp_path / 'run'}", "debug.slow_module=1", "debug.slow_s=120"]
    t0 = time.monotonic()
    result = run_torchrun(2, [*args, "pipeline.timeout_s=5"], timeout=200)
    elapsed = time.monotonic() - t0
    assert result.returncode != 0
    # the hung rank is named, not the neighbour that waited for its gradient
    assert "error: rank 1 (module 1): stuck or dead: its neighbours waited 5 s for it" in result.stderr, (
        result.stderr[-2000:]
    )
    assert elapsed < 100, elapsed  # well before the hung rank would wake up
