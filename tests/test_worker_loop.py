"""The worker loop's contract with an inbox: a message's tensors are valid until it is released."""

from __future__ import annotations

import torch

from trgl_pipe.runtime.buffer import LocalControl, Waiter
from trgl_pipe.runtime.clock import HostClock
from trgl_pipe.runtime.messages import Kind, Message
from trgl_pipe.training.loop import run_worker


class ViewModule:
    """A module whose output is a view of its input (a flatten, an identity)."""

    index = 0

    def restart_clock(self) -> None:
        pass

    def handle(self, msg: Message) -> Message:
        return msg if msg.x is None else msg.forward(msg.x.view(-1), msg.image)


class SlotInbox:
    """Like a link between ranks: the activation is a receive slot, and the next message lands in
    it as soon as the current one is released."""

    gate = None

    def __init__(self) -> None:
        self.slot = torch.arange(6.0)
        self.messages = [Message(Kind.TRAIN, self.slot.view(2, 3), torch.zeros(2)), Message(Kind.STOP)]

    def recv(self, waiter: Waiter) -> Message:
        return self.messages.pop(0)

    def release(self, msg: Message) -> None:
        self.slot.fill_(-1.0)  # the next message's bytes

    def close(self, waiter: Waiter) -> None:
        pass


class RecordingOutbox:
    def __init__(self) -> None:
        self.sent: list[torch.Tensor | None] = []

    def send(self, msg: Message, waiter: Waiter) -> float:
        self.sent.append(None if msg.x is None else msg.x.clone())
        return 0.0

    def close(self, waiter: Waiter) -> None:
        pass


def test_an_output_that_is_a_view_of_the_released_input_is_sent_as_computed() -> None:
    outbox = RecordingOutbox()
    waiter = Waiter(LocalControl(), 5, "rank 1")
    run_worker([ViewModule()], SlotInbox(), outbox, waiter, HostClock())
    assert outbox.sent[0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # not the next message's -1s
    assert outbox.sent[1] is None  # the STOP
