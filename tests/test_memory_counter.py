"""The tensor-byte counter of benchmarks/memory.py on allocation patterns whose peak is known."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from memory import LiveTensorBytes


def test_the_counter_follows_allocations_and_releases() -> None:
    counter = LiveTensorBytes()
    with counter:
        a = torch.empty(1000, device="meta")  # 4,000 bytes
        b = torch.empty(2000, device="meta")  # 8,000: 12,000 live
        del a  # 8,000 live
        c = torch.empty(500, device="meta")  # 2,000: 10,000 live
        view = b[:100]  # a view shares b's storage: no new bytes
        d = b.clone()  # a copy does: 18,000 live, the peak
        del b, view  # the storage goes only when its last view goes: 10,000 live
    assert counter.peak == 18_000
    assert counter.current == 10_000
    del c, d
    assert counter.current == 0


def test_the_counter_sees_what_a_training_step_keeps() -> None:
    # y = relu(x @ w): x [64, 32] and w [32, 16] enter from outside the mode; the step makes the
    # product (4 KiB), relu's output (4 KiB), and in backward the gradients of the product (4 KiB),
    # of w (2 KiB) and relu's mask; the peak is at least the three 4 KiB tensors alive together.
    x = torch.empty(64, 32, device="meta")
    w = torch.empty(32, 16, device="meta", requires_grad=True)
    counter = LiveTensorBytes()
    with counter:
        y = torch.relu(x @ w)
        y.sum().backward()
    assert 3 * 64 * 16 * 4 <= counter.peak <= 6 * 64 * 16 * 4 + 32 * 16 * 4
    assert w.grad is not None and w.grad.shape == (32, 16)
