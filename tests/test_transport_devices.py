"""Which device every payload is on when the transport hands it to torch.distributed.

The ``cpu:gloo,cuda:nccl`` group picks the backend from the tensor's device, and NCCL ignores
tags: a payload sent from the host while the receiver posts a CUDA receive goes over gloo, and the
CUDA receive then matches the next activation. The decision runs here on a CPU: a "meta" device
stands in for the GPU of an NCCL link (tensors move there without CUDA), and the backend's send is
replaced by one that records what it was given.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

import pytest
import torch

from trgl_pipe.runtime import transport
from trgl_pipe.runtime.buffer import LocalControl, Waiter
from trgl_pipe.runtime.messages import Kind, Message

CPU, GPU, FAKE_GPU = torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")


@pytest.mark.parametrize(
    ("device", "staged", "expected"),
    [
        (CPU, False, CPU),  # CPU ranks: gloo
        (GPU, False, GPU),  # a GPU per rank: NCCL, every payload from and into the GPU
        (GPU, True, CPU),  # ranks sharing a GPU: gloo through host memory
    ],
    ids=["cpu-gloo", "gpu-nccl", "gpu-staged"],
)
def test_every_link_kind_has_one_wire_device(device, staged, expected) -> None:
    link = transport.LinkSettings(None, 2, 8, device, 5.0, staged)
    assert transport.wire_device(device, staged) == expected == link.wire


class _Done:
    def wait(self, timeout: timedelta | None = None) -> bool:
        return True


@pytest.fixture
def sent(monkeypatch) -> list[tuple[int, torch.Tensor]]:
    """Every (tag, tensor) an outbox hands to the backend; every send completes at once."""
    record: list[tuple[int, torch.Tensor]] = []

    def isend(tensor, rank, peer, group, tag):
        record.append((tag, tensor))
        return _Done()

    monkeypatch.setattr(transport, "_isend", isend)
    return record


PAYLOADS = {
    transport.DATA_TAG: "activation",
    transport.IMAGE_TAG: "image",
    transport.BACKWARD_TAGS[1]: "gradient",
}


@pytest.mark.parametrize(
    ("device", "staged"), [(CPU, False), (FAKE_GPU, False)], ids=["cpu-gloo", "gpu-nccl"]
)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_every_payload_is_handed_over_on_the_links_device(sent, device, staged, backward) -> None:
    link = transport.LinkSettings(None, 2, 8, device, 5.0, staged)
    tags = transport.BACKWARD_TAGS if backward else (transport.HEADER_TAG, transport.DATA_TAG)
    outbox = transport.DistOutbox(0, 1, link, tags=tags)
    # the first rank's image is the host batch, whatever the link; the output is on the rank's device
    image = torch.randn(3, 1, 4, 4)
    out = torch.randn(3, 2, 4, 4).to(device)
    msg = Message(Kind.TRAIN, out, torch.arange(3), image=None if backward else image)
    outbox.send(msg, Waiter(LocalControl(), 5, "rank 0"))
    outbox.close(Waiter(LocalControl(), 5, "rank 0"))
    header_tag, data_tag = tags[0], tags[1]
    by_tag = {tag: t for tag, t in sent}
    assert by_tag[header_tag].device == CPU  # labels and counters: the host (gloo) always
    assert by_tag[header_tag][transport.HEADER : transport.HEADER + 3].tolist() == [0, 1, 2]
    payloads = {tag: t for tag, t in sent if tag != header_tag}
    expected = {data_tag, *([] if backward else [transport.IMAGE_TAG])}
    assert set(payloads) == expected
    for tag, tensor in payloads.items():
        assert tensor.device == link.wire, (PAYLOADS.get(tag, tag), tensor.device, link.wire)


def test_on_an_nccl_link_the_receiver_posts_its_receives_on_the_gpu(monkeypatch) -> None:
    posted: list[tuple[int, torch.device]] = []

    def irecv(tensor, peer, group=None, tag=None):
        posted.append((tag, tensor.device))
        return _Done()

    monkeypatch.setattr(transport.dist, "irecv", irecv)
    link = transport.LinkSettings(None, 2, 8, FAKE_GPU, 5.0, False)
    inbox = transport.DistInbox(1, 0, link, image_shape=(1, 4, 4))
    inbox.feature_shape = (2, 4, 4)
    inbox._slots = inbox._allocate_slots()
    assert [s.device for s in inbox._slots] == [FAKE_GPU, FAKE_GPU]
    x, _, image = inbox._receive_payload(0, 3, with_image=True)
    assert x.device == image.device == FAKE_GPU
    assert posted == [(transport.DATA_TAG, FAKE_GPU), (transport.IMAGE_TAG, FAKE_GPU)]


def test_a_gpu_rank_receives_labels_and_staged_images_in_pinned_host_memory(monkeypatch) -> None:
    # pageable host memory makes the copy to the GPU block the host; a staged image stays on the
    # host (the stage copies it if it reads it, the next link sends it as it is)
    pinned: list[tuple[int, ...]] = []

    def pin_memory(self):
        pinned.append(tuple(self.shape))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(transport, "use_device", lambda device: None)  # no CUDA here
    monkeypatch.setattr(transport, "side_stream", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(transport.dist, "irecv", lambda tensor, peer, group=None, tag=None: _Done())
    link = transport.LinkSettings(None, 2, 8, GPU, 5.0, staged=True)
    inbox = transport.DistInbox(1, 0, link, image_shape=(1, 4, 4))
    image = inbox._receive_image(3, inbox.wire)
    assert image.device == CPU and pinned == [(3, 1, 4, 4)]
    inbox._headers = [transport._encode_header(Message(Kind.TRAIN, None, torch.arange(3)), 8)]
    monkeypatch.setattr(
        inbox, "_receive_payload", lambda slot, n, with_image: (torch.zeros(n, 2), None, None)
    )
    pinned.clear()
    msg, _ = inbox._arrival(0)
    assert msg.y.tolist() == [0, 1, 2] and pinned == [(3,)]
