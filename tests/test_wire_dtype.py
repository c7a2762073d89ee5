"""pipeline.wire_dtype: activations cast for the wire and back, the same in every transport."""

from __future__ import annotations

from pathlib import Path

import pytest

from trgl_pipe.errors import ConfigError
from trgl_pipe.training.single import run_single
from trgl_pipe.watch.metrics import read_metrics


def _losses(out: str) -> dict[tuple[int, int], float]:
    events = read_metrics(Path(out) / "metrics.jsonl")
    return {(e["module"], e["step"]): e["loss"] for e in events if e["event"] == "train"}


def test_a_bf16_wire_changes_only_what_later_modules_receive_and_sim_computes_the_same(tiny) -> None:
    fp32 = tiny("train.epochs=1")
    bf16 = tiny("train.epochs=1", "pipeline.wire_dtype=bf16")
    sim = tiny("train.epochs=1", "pipeline.wire_dtype=bf16", "pipeline.transport=sim")
    for cfg in (fp32, bf16, sim):
        run_single(cfg, console_summary=False)
    a, b, c = _losses(fp32.out_dir), _losses(bf16.out_dir), _losses(sim.out_dir)
    assert len(a) == 2 * 5 and b == c  # the threads with their buffers see the same casts
    first = [key for key in a if key[0] == 0]
    assert all(a[key] == b[key] for key in first)  # module 0 reads the image, not the wire
    assert all(a[key] != b[key] for key in a if key[0] == 1)  # module 1 reads rounded activations


@pytest.mark.parametrize("regime", ["sequential", "e2e"])
def test_a_wire_dtype_outside_the_parallel_regime_is_refused(tiny, regime: str) -> None:
    with pytest.raises(
        ConfigError, match=f"pipeline.wire_dtype=bf16 applies to train.regime=parallel .* not to {regime}"
    ):
        tiny(f"train.regime={regime}", "pipeline.wire_dtype=bf16")
