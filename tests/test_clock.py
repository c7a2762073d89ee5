"""The CUDA event clock's accounting, with a stand-in for CUDA events whose timestamps are the
moments the test says the GPU reached them: input wait vs the host's send time, event reuse."""

from __future__ import annotations

import pytest
import torch

from trgl_pipe.runtime.clock import CudaEventClock


class FakeGpu:
    def __init__(self) -> None:
        self.now = 0.0  # seconds: where the (idle) stream is when an event is recorded
        self.made = 0


@pytest.fixture
def gpu(monkeypatch) -> FakeGpu:
    state = FakeGpu()

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            state.made += 1
            self.t: float | None = None

        def record(self, stream=None) -> None:
            self.t = state.now

        def query(self) -> bool:
            return True

        def elapsed_time(self, other: Event) -> float:
            return (other.t - self.t) * 1e3  # milliseconds, as CUDA's

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return state


def _step(clock: CudaEventClock, gpu: FakeGpu, send_s: float, input_s: float, compute_s: float) -> None:
    """One loop turn: the host sends (GPU idle), then waits for input, then computes."""
    gpu.now += send_s
    clock.waiting_for_input()
    gpu.now += input_s
    with clock.region("train/1"):
        gpu.now += compute_s


def test_time_spent_sending_is_not_counted_as_input_wait(gpu: FakeGpu) -> None:
    clock = CudaEventClock(torch.device("cuda", 0))
    for _ in range(10):
        _step(clock, gpu, send_s=0.5, input_s=0.25, compute_s=1.0)
    clock.settle()
    assert clock.total("train/1") == pytest.approx(10.0)
    assert clock.total("recv_wait") == pytest.approx(10 * 0.25)  # not 10 × 0.75


def test_events_are_reused_not_made_per_batch(gpu: FakeGpu) -> None:
    clock = CudaEventClock(torch.device("cuda", 0))
    for _ in range(5):
        _step(clock, gpu, 0.1, 0.1, 0.1)
    made = gpu.made
    for _ in range(100):
        _step(clock, gpu, 0.1, 0.1, 0.1)
    assert gpu.made == made


def test_without_marks_the_gap_between_regions_is_the_input_wait(gpu: FakeGpu) -> None:
    # one process (no pipeline loop): the GPU waits for the data between steps
    clock = CudaEventClock(torch.device("cuda", 0))
    for _ in range(4):
        gpu.now += 0.5
        with clock.region("train/0"):
            gpu.now += 1.0
    clock.settle()
    assert clock.total("recv_wait") == pytest.approx(3 * 0.5)
