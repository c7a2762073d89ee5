"""Which CUDA stream each thread of the transport waits on, and activations that cross a rank
boundary without a copy. CUDA's stream API is replaced by a stand-in that tracks each thread's
current stream, so this runs on any machine; gpu_check measures the real stall on a GPU."""

from __future__ import annotations

import contextlib
import threading
from datetime import timedelta

import pytest
import torch

from trgl_pipe.runtime import transport
from trgl_pipe.runtime.buffer import LocalControl, Waiter


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeCuda:
    """Per-thread current streams, as CUDA has them: every thread starts on the default stream."""

    def __init__(self) -> None:
        self.default = FakeStream("default")
        self.created: list[FakeStream] = []
        self._local = threading.local()

    def Stream(self, device=None) -> FakeStream:  # torch.cuda.Stream
        stream = FakeStream(f"side-{len(self.created)}")
        self.created.append(stream)
        return stream

    @contextlib.contextmanager
    def stream(self, s: FakeStream):
        previous = getattr(self._local, "current", self.default)
        self._local.current = s
        try:
            yield
        finally:
            self._local.current = previous

    def current_stream(self, device=None) -> FakeStream:
        return getattr(self._local, "current", self.default)


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeCuda:
    fake = FakeCuda()
    for name in ("Stream", "stream", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    return fake


class RecordingWork:
    """An NCCL work whose wait notes the stream current in the waiting thread (where
    ProcessGroupNCCL's wait makes that stream wait for the transfer)."""

    def __init__(self, fake: FakeCuda) -> None:
        self.fake = fake
        self.waited_on: list[FakeStream] = []

    def wait(self, timeout: timedelta | None = None) -> bool:
        self.waited_on.append(self.fake.current_stream())
        return True


def test_the_completer_waits_for_sends_on_a_stream_of_its_own(fake_cuda: FakeCuda) -> None:
    completer = transport._Completer("sends-to-1", torch.device("cuda", 0))
    works = [RecordingWork(fake_cuda) for _ in range(3)]
    for work in works:
        completer.add([work], [])
    completer.close(Waiter(LocalControl(), 5, "rank 0"), "sends to rank 1")
    streams = [s for w in works for s in w.waited_on]
    assert len(streams) == 3
    assert all(s is not fake_cuda.default for s in streams), "the completer stalled the training stream"
    assert {s.name for s in streams} == {completer.stream.name}
    assert completer.stream in fake_cuda.created
    assert fake_cuda.current_stream() is fake_cuda.default  # the main thread's stream is untouched


def test_a_deferred_send_starts_and_is_waited_in_the_completer_thread(fake_cuda: FakeCuda) -> None:
    completer = transport._Completer("sends-to-1", torch.device("cuda", 0))
    work = RecordingWork(fake_cuda)
    started_in: list[str] = []

    def later() -> RecordingWork:
        started_in.append(threading.current_thread().name)
        return work

    completer.add([], [], later=later)
    completer.close(Waiter(LocalControl(), 5, "rank 0"), "sends to rank 1")
    assert started_in == ["sends-to-1"]
    assert work.waited_on == [completer.stream]


def test_on_a_cpu_the_completer_enters_no_stream() -> None:
    completer = transport._Completer("sends-to-1", torch.device("cpu"))
    completer.close(Waiter(LocalControl(), 5, "rank 0"), "sends to rank 1")
    assert completer.stream is None


def test_a_channels_last_activation_travels_as_its_own_memory() -> None:
    x = torch.randn(3, 5, 4, 6).contiguous(memory_format=torch.channels_last)
    wire = transport.to_wire(x, channels_last=True)
    assert wire.is_contiguous() and wire.data_ptr() == x.data_ptr()  # no copy to send
    assert wire.shape == (3, 4, 6, 5)
    slot = torch.empty(8, 4, 6, 5)  # a receive slot in the wire's shape, as the inbox allocates
    slot[:3].copy_(wire)
    back = transport.from_wire(slot[:3], channels_last=True)
    assert torch.equal(back, x) and back.is_contiguous(memory_format=torch.channels_last)
    assert back.data_ptr() == slot.data_ptr()  # no copy after receiving either
    flat = torch.randn(3, 5, 4, 6)
    assert transport.to_wire(flat, channels_last=False).data_ptr() == flat.data_ptr()


def test_the_handshake_carries_the_layout() -> None:
    info = transport._encode_info((16, 7, 7), torch.bfloat16, True)
    assert transport._decode_info(info) == ((16, 7, 7), torch.bfloat16, True)
    assert transport._decode_info(transport._encode_info((49, 96), torch.float32, False)) == (
        (49, 96),
        torch.float32,
        False,
    )
