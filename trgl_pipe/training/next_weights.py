"""Weights from the next module (``Objective.needs_from_next = ("weights",)``, MAN).

Module k+1 sends what its objective picks from its first block (:meth:`Objective.weights_for_previous`)
after every N-th update (N = ``weights_every``), starting with its initial weights; module k, at
its step t (t ≥ N, t a multiple of N), takes the weights module k+1 had after update t − N. So
module k never waits for module k+1 by more than N − 1 steps, and every transport (one process,
the in-process pipeline, torchrun ranks) hands each module the same weights at the same step:
the pipeline computes what one process computes.

A module keeps the weights it sent that the module before it may not have taken yet (the updates
in [t − N, t]) and sends them again when a run resumes from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from trgl_pipe.errors import PipelineError
from trgl_pipe.runtime.buffer import Waiter
from trgl_pipe.runtime.messages import Kind, Message
from trgl_pipe.runtime.transport import BackwardLinks, LinkSettings
from trgl_pipe.stage import Stage

Send = Callable[[int, Tensor], None]
Receive = Callable[[], tuple[int, Tensor]]


class NextWeights:
    """One module's part: it sends to the module before it and/or takes from the one after it."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        objective = stage.objective
        self.every = int(objective.weights_every)
        last = stage.plan.num_modules - 1
        self.sends = stage.index > 0 and self.every > 0
        self.receives = stage.index < last and self.every > 0
        self.held: list[tuple[int, Tensor]] = []  # (update, flat weights) sent, maybe not yet taken
        self.send: Send | None = None
        self.receive: Receive | None = None
        self.shapes: list[torch.Size] = []
        if self.receives:
            block = stage.objective.spec.next_block
            assert block is not None
            self.shapes = [w.shape for w in objective.weights_for_previous(block)]

    def _flat(self) -> Tensor:
        weights = self.stage.objective.weights_for_previous(self.stage.body.blocks[0])
        return torch.cat([w.detach().reshape(-1).float() for w in weights])

    def start(self) -> None:
        """Before the first step (fresh or resumed): send what the module before may still need."""
        if not self.sends:
            return
        steps = self.stage.num_steps
        if not self.held and steps % self.every == 0:
            self.held.append((steps, self._flat().cpu()))
        for update, flat in self.held:
            self._send(update, flat)

    def _send(self, update: int, flat: Tensor) -> None:
        if self.send is None:
            k = self.stage.index
            raise PipelineError(f"module {k}: no link to send weights to module {k - 1}")
        self.send(update, flat)

    def before_step(self) -> None:
        """Module k at step t: take module k+1's weights after update t − N, when due."""
        t = self.stage.num_steps
        if not self.receives or t < self.every or t % self.every:
            return
        if self.receive is None:
            k = self.stage.index
            raise PipelineError(f"module {k}: no link to receive module {k + 1}'s weights")
        update, flat = self.receive()
        if update != t - self.every:
            raise PipelineError(
                f"module {self.stage.index} at step {t} got module {self.stage.index + 1}'s weights after "
                f"update {update}, expected {t - self.every}"
            )
        weights = list(torch.split(flat, [s.numel() for s in self.shapes]))
        weights = [w.view(s) for w, s in zip(weights, self.shapes, strict=True)]
        self.stage.objective.take_next_weights(self.stage.aux, weights, self.every)

    def after_step(self) -> None:
        """Module k+1 after its update c: send its weights when c is a multiple of N."""
        c = self.stage.num_steps
        if not self.sends or c % self.every:
            return
        flat = self._flat().cpu()
        self.held = [(u, w) for u, w in self.held if u >= c - self.every] + [(c, flat)]
        self._send(c, flat)

    def state_dict(self) -> dict[str, Any]:
        return {"held": [(u, w.clone()) for u, w in self.held]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.held = [(int(u), w) for u, w in state["held"]]


class Mailbox:
    """Weights from one module to the one before it inside one process: FIFO, unbounded (two are
    in flight at most); with a ``waiter`` a take waits (threads), without it one must be there."""

    def __init__(self, receiver: int) -> None:
        self.receiver = receiver
        self.items: queue.Queue[tuple[int, Tensor]] = queue.Queue()

    def put(self, update: int, flat: Tensor) -> None:
        self.items.put((update, flat))

    def take(self, waiter: Waiter | None = None) -> tuple[int, Tensor]:
        if waiter is None:
            try:
                return self.items.get_nowait()
            except queue.Empty:
                k = self.receiver
                raise PipelineError(f"module {k}: no weights from module {k + 1}") from None

        def attempt(timeout: float) -> tuple[int, Tensor] | None:
            try:
                return self.items.get(timeout=timeout)
            except queue.Empty:
                return None

        return waiter.wait(attempt, f"weights from module {self.receiver + 1}")


def connect_in_process(
    parts: Sequence[NextWeights | None], waiters: Sequence[Waiter | None] | None = None
) -> None:
    """Link consecutive modules of one process (``parts`` in module order; ``waiters``: the
    receiving module's, when modules run on threads)."""
    for i in range(len(parts) - 1):
        before, after = parts[i], parts[i + 1]
        if before is None or after is None or not (before.receives and after.sends):
            continue
        box = Mailbox(before.stage.index)
        waiter = waiters[i] if waiters is not None else None
        after.send = box.put
        before.receive = lambda box=box, waiter=waiter: box.take(waiter)


class WeightsBack:
    """A torchrun rank's ends of the weights' link: from its first module to the rank before, and
    from the rank after to its last module, over :class:`BackwardLinks` (bounded, credited, on a
    communicator of its own); inside the rank, module to module directly."""

    def __init__(self, chain: Sequence[Any], links: BackwardLinks) -> None:
        self.chain = chain
        self.links = links

    def serve(self, waiter: Waiter) -> None:
        """Link the rank's modules, then send what the rank before may need first."""
        parts = [w.next_weights for w in self.chain]
        connect_in_process(parts)  # one thread runs them in order: each message is there
        first, last = parts[0], parts[-1]
        links = self.links
        if first is not None and first.sends and links.outbox is not None:
            outbox = links.outbox
            label = torch.zeros(1, dtype=torch.int64)  # one "sample": the flat weights

            def send(update: int, flat: Tensor) -> None:
                outbox.send(Message(Kind.TRAIN, flat[None], label, step=update), waiter)

            first.send = send
        if last is not None and last.receives and links.inbox is not None:

            def receive() -> tuple[int, Tensor]:
                msg = links.recv(waiter)
                if msg.kind is not Kind.TRAIN or msg.x is None:
                    raise PipelineError(f"rank ended its weights before module {last.stage.index} took them")
                return msg.step, msg.x[0]

            last.receive = receive
        for part in parts:
            if part is not None:
                part.start()

    def close(self, waiter: Waiter) -> None:
        self.links.close(waiter)


def connect_weights(
    chain: Sequence[Any],
    rank: int,
    previous: int | None,
    following: int | None,
    link: LinkSettings,
    group: Any,
) -> WeightsBack:
    """Open the weights' link of a rank whose modules (``chain``, workers) need it (all ranks do:
    the handshakes run in rank order, as the gradients' link's)."""
    first = chain[0].next_weights
    size = sum(s.numel() for s in _sent_shapes(first)) if first is not None and first.sends else 1
    settings = dataclasses.replace(link, group=group, capacity=max(2, link.capacity), max_batch=1)
    sample = ((size,), torch.float32)
    return WeightsBack(chain, BackwardLinks.connect(rank, previous, following, settings, sample))


def _sent_shapes(part: NextWeights) -> list[torch.Size]:
    return [w.shape for w in part.stage.objective.weights_for_previous(part.stage.body.blocks[0])]
