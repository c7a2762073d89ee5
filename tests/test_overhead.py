"""benchmarks/overhead.py's in-process measurement and its summary (the torchrun part runs in the
benchmark itself)."""

from __future__ import annotations

import sys

import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import overhead


def test_both_sim_chains_carry_every_message_and_the_summary_pairs_them() -> None:
    x = torch.zeros(overhead.BATCH, 16)
    samples = []
    for repeat in range(2):
        raw = overhead._sim_raw(3, x, 200, 2)
        runtime = overhead._sim_runtime(3, x, 200, 2)
        samples.append(
            {"link": "sim", "k": 3, "size": 4096, "buffer": 2, "repeat": repeat, "n": 200}
            | {"raw": raw, "runtime": runtime}
        )
    (row,) = overhead.summarise(samples)
    assert row["K"] == 3 and row["size"] == "4 KiB" and row["repeats"] == 2
    assert row["variant"] == "runtime" and row["ratio"] > 0 and row["µs/msg"] > 0
    assert abs(row["msg/s"] - 1e6 / row["µs/msg"]) / row["msg/s"] < 0.01
    assert abs(row["µs/msg over raw"] - (row["µs/msg"] - row["raw µs/msg"])) < 0.2


def test_message_counts_scale_with_the_size() -> None:
    assert overhead.messages_for(4 * 1024) == 2000
    assert overhead.messages_for(16 * 1024 * 1024) == 40
