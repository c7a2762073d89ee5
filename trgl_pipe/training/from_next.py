"""What a module needs from the next one (``Objective.needs_from_next``): its weights (MAN) or a
gradient (HPFF), in every transport.

**Weights.**
Module k+1 sends what its objective picks from its first block (:meth:`Objective.weights_for_previous`)
after every N-th update (N = ``weights_every``), starting with its initial weights; module k, at
its step t (t ≥ N, t a multiple of N), takes the weights module k+1 had after update t − N. So
module k never waits for module k+1 by more than N − 1 steps, and every transport (one process,
the in-process pipeline, torchrun ranks) hands each module the same weights at the same step:
the pipeline computes what one process computes.

A module keeps the weights it sent that the module before it may not have taken yet (the updates
in [t − N, t]) and sends them again when a run resumes from a checkpoint.

**Gradients.** Module k+1 sends the gradient of its objective's ``loss_for_previous`` with respect
to its input (module k's output of that batch) after each step; module k, at its next step, adds
it backpropagated through its body at that batch's input, with its current weights, before its
optimizer's step: one step late. The sender keeps its last gradient and the receiver its last
input in their checkpoints, so a resumed run sends and replays exactly what an uninterrupted one
does.
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
            self.held.append((steps, self._flat()))
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
        flat = self._flat()
        self.held = [(u, w) for u, w in self.held if u >= c - self.every] + [(c, flat)]
        self._send(c, flat)

    def state_dict(self) -> dict[str, Any]:
        return {"held": [(u, w.clone()) for u, w in self.held]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.held = [(int(u), w) for u, w in state["held"]]


class NextGradient:
    """One module's part of the gradients' exchange: it sends ∂loss_for_previous/∂input to the module
    before it and/or replays the one the module after it sent, one step late."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.sends = stage.index > 0
        self.receives = stage.index < stage.plan.num_modules - 1
        self.held: list[tuple[int, Tensor]] = []  # the last gradient sent (sent again on resume)
        self.kept: tuple[int, Tensor] | None = None  # the last step's input, for the replay
        self.send: Send | None = None
        self.receive: Receive | None = None

    def start(self) -> None:
        """Before the first step (fresh or resumed): send the gradient not yet replayed."""
        for step, grad in self.held:
            self._send(step, grad)

    def _send(self, step: int, grad: Tensor) -> None:
        if self.send is None:
            k = self.stage.index
            raise PipelineError(f"module {k}: no link to send its gradient to module {k - 1}")
        self.send(step, grad)

    def _replay(self, t: int) -> None:
        if self.receive is None:
            k = self.stage.index
            raise PipelineError(f"module {k}: no link to receive module {k + 1}'s gradient")
        step, grad = self.receive()
        if step != t - 1 or self.kept is None or self.kept[0] != t - 1:
            raise PipelineError(
                f"module {self.stage.index} at step {t} got module {self.stage.index + 1}'s gradient of "
                f"step {step}, expected {t - 1}"
            )
        self.stage.replay_gradient(self.kept[1], grad)

    def train_step(self, x: Tensor, y: Tensor, image: Tensor | None) -> Tensor:
        """The stage's training step with the gradient from the next module added and the one for
        the module before computed."""
        t = self.stage.num_steps
        replay = (lambda: self._replay(t)) if self.receives and t >= 1 else None
        out = self.stage.train_step(x, y, image, input_gradient=self.sends, before_update=replay)
        if self.receives:
            self.kept = (t, x.detach().clone())
        if self.sends:
            grad = self.stage.last_input_gradient.detach()
            self.held = [(t, grad)]
            self._send(t, grad)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"held": list(self.held), "kept": self.kept}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.held = [(int(s), g) for s, g in state["held"]]
        kept = state["kept"]
        self.kept = None if kept is None else (int(kept[0]), kept[1])


class Mailbox:
    """Weights or gradients from one module to the one before it inside one process: FIFO,
    unbounded (two are in flight at most); with a ``waiter`` a take waits (threads), without it
    one must be there."""

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
                raise PipelineError(f"module {k}: nothing from module {k + 1}") from None

        def attempt(timeout: float) -> tuple[int, Tensor] | None:
            try:
                return self.items.get(timeout=timeout)
            except queue.Empty:
                return None

        return waiter.wait(attempt, f"weights or a gradient from module {self.receiver + 1}")


def connect_in_process(
    parts: Sequence[NextWeights | NextGradient | None], waiters: Sequence[Waiter | None] | None = None
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


class LinkBack:
    """A torchrun rank's ends of the link back: from its first module to the rank before, and from
    the rank after to its last module, over :class:`BackwardLinks` (bounded, on a
    communicator of its own); inside the rank, module to module directly."""

    def __init__(self, chain: Sequence[Any], links: BackwardLinks) -> None:
        self.chain = chain
        self.links = links

    def serve(self, waiter: Waiter) -> None:
        """Link the rank's modules, then send what the rank before may need first."""
        first, last = _part(self.chain[0]), _part(self.chain[-1])
        links = self.links
        if first is not None and first.sends and links.outbox is not None:
            outbox = links.outbox

            def send(step: int, tensor: Tensor) -> None:
                batch = tensor if isinstance(first, NextGradient) else tensor[None]
                labels = torch.zeros(batch.shape[0], dtype=torch.int64)  # the header counts rows by them
                outbox.send(Message(Kind.TRAIN, batch, labels, step=step), waiter)

            first.send = send
        if last is not None and last.receives and links.inbox is not None:

            def receive() -> tuple[int, Tensor]:
                msg = links.recv(waiter)
                if msg.kind is not Kind.TRAIN or msg.x is None:
                    raise PipelineError(f"the rank after module {last.stage.index} stopped sending")
                return msg.step, msg.x if isinstance(last, NextGradient) else msg.x[0]

            last.receive = receive
        link_workers(self.chain)  # one thread runs them in order: each message is there

    def close(self, waiter: Waiter) -> None:
        self.links.close(waiter)


def _part(worker: Any) -> NextWeights | NextGradient | None:
    return worker.next_weights if worker.next_weights is not None else worker.next_gradient


def link_workers(workers: Sequence[Any], waiters: Sequence[Waiter | None] | None = None) -> None:
    """Link the exchanges of consecutive workers of one process and let each send what the one
    before it needs first (one process, the in-process pipeline)."""
    parts = [_part(w) for w in workers]
    connect_in_process(parts, waiters)
    for part in parts:
        if part is not None:
            part.start()


def connect_link_back(
    chain: Sequence[Any],
    rank: int,
    previous: int | None,
    following: int | None,
    link: LinkSettings,
    group: Any,
    input_sample: tuple[tuple[int, ...], torch.dtype],
) -> LinkBack:
    """Open the link back of a rank whose modules (``chain``, workers) need one (all ranks do: the
    handshakes run in rank order, as the delayed regimes' gradients' link's). ``input_sample``:
    the shape and dtype of one sample of the rank's input (a gradient has that shape)."""
    first = _part(chain[0])
    if isinstance(first, NextGradient):
        settings = dataclasses.replace(link, group=group, capacity=max(2, link.capacity))
        sample = input_sample
    else:
        size = first._flat().numel() if first is not None and first.sends else 1
        settings = dataclasses.replace(link, group=group, capacity=max(2, link.capacity), max_batch=1)
        sample = ((size,), torch.float32)
    return LinkBack(chain, BackwardLinks.connect(rank, previous, following, settings, sample))
