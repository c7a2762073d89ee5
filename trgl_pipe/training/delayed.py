"""Delayed-gradient training (DDG and Features Replay) in one process, with the papers' delays.

Both keep the end-to-end objective: one loss, at the last module's head (the network's own
classifier); the auxiliary heads of the other modules are not trained. What they break is
*backward locking*: module k (0-based, of K) updates with the gradient of a batch it forwarded
``delay_k = K - 1 - k`` steps ago, so no module waits for the backward of the modules after it.

At step t, every module forwards batch t with its current weights (the forward stays locked, as
in the analysis of both papers); the last module backpropagates the loss of batch t at once and
sends the gradient with respect to its input back; module k < K-1 applies the gradient that
module k+1 sent at step t-1, which belongs to batch t - delay_k. See docs/pipeline.md for the
picture.

- **DDG** (Huo et al., ICML 2018, "Decoupled Parallel Backpropagation with Convergence
  Guarantee") keeps the graph of every batch whose gradient is still to come, built with the
  weights of the step it was forwarded at (a copy of them: the optimizer updates the live ones in
  place), so module k applies exactly ∇f(w^{t-delay_k}).
- **FR** (Huo et al., NeurIPS 2018, "Training Neural Networks Using Features Replay") keeps only
  the inputs, and when the gradient arrives replays the forward with the *current* weights and
  backpropagates through that (less memory, one more forward).

``train.delays=none`` makes every backward link instantaneous (delay 0): DDG is then ordinary
backpropagation cut into modules, and equals the e2e regime.

In-flight work travels with checkpoints: each pending batch's input and, for DDG, the weights and
BatchNorm buffers its forward used, from which the graph is rebuilt exactly on resume.

With data-parallel replicas (a torchrun pipeline with ``pipeline.replicas`` R > 1), replica r of
every module trains on shard r of each batch and exchanges gradients with replica r of its
neighbours only; before each update the module's gradients are averaged over its replicas by an
explicit all-reduce (:func:`trgl_pipe.training.replicas.average_gradients`: DDP's hooks do not see
a backward that runs steps later on a stored graph), and before each training forward replica
0's BatchNorm buffers are copied to the others (DDP's rule). A checkpoint holds every replica's
batches in flight (replica 0 gathers them), so it resumes with the same R only.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from trgl_pipe.context import RunContext
from trgl_pipe.errors import CheckpointError
from trgl_pipe.folder.checkpoint import Progress
from trgl_pipe.objectives import LocalInputs
from trgl_pipe.runtime.messages import Kind, Message
from trgl_pipe.runtime.schedule import Position, parallel_stream
from trgl_pipe.stage import Stage
from trgl_pipe.training.replicas import average_gradients, gather_to_first
from trgl_pipe.training.worker import StageWorker


def paper_delays(num_modules: int) -> list[int]:
    """Steps by which module k's update lags its forward: K-1-k (the last module has none)."""
    return [num_modules - 1 - k for k in range(num_modules)]


def _bytes(tensors: Iterable[Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


@dataclass
class _Pending:
    """One batch whose gradient has not arrived yet."""

    step: int  # the global step the batch was forwarded at
    x: Tensor  # the module's input (detached)
    version: int  # the module's updates before that forward
    params: list[Tensor] | None = None  # DDG: the weights of that forward (leaves of its graph)
    buffers: list[Tensor] | None = None  # DDG: BatchNorm buffers before that forward
    inp: Tensor | None = None  # DDG: the input leaf of the graph
    out: Tensor | None = None  # DDG: the output, carrying the graph
    saved_bytes: int = 0


@dataclass
class Applied:
    """A record of one update (tests): at ``time`` the module applied the gradient of ``batch``,
    computed with the weights it had after ``weights_version`` of its own updates."""

    time: int
    batch: int
    weights_version: int
    grads: list[Tensor]  # the gradient of every parameter of the body, as applied
    weights: list[Tensor]  # the body's parameters just before this update
    grad_out: Tensor | None  # what the next module sent (None for the last module)


def _alone(params: list[Tensor]) -> None:
    """No replicas: the gradients are this process's own."""


@dataclass
class DelayedModule:
    """Module k's side of a delayed-gradient regime: its pending batches and its update rule.

    Saved with the module's checkpoint shard (``StageWorker.carry``), so a resumed run continues
    with the same batches in flight.
    """

    stage: Stage
    mode: str  # "ddg" or "fr"
    delay: int
    is_last: bool
    record: bool = False
    pending: deque[_Pending] = field(default_factory=deque)
    # what module k+1 sent this one: (batch, ∂loss/∂output, the step it can be applied at)
    grads: deque[tuple[int, Tensor, int]] = field(default_factory=deque)
    held_bytes_peak: int = 0
    held_batches_peak: int = 0
    applied: list[Applied] = field(default_factory=list)
    # data-parallel replicas (set by attach_rank): this one's index, their number, the gradient
    # average before each update, and the gather of every replica's state onto replica 0
    replica: int = 0
    num_replicas: int = 1
    average: Callable[[list[Tensor]], None] = _alone
    gather: Callable[[Any], list[Any]] | None = None
    replica_states: list[dict[str, Any]] = field(default_factory=list)  # replica 0: the others'

    # -- forward ----------------------------------------------------------------------------

    def _snapshot(self) -> tuple[list[str], list[Tensor]]:
        names = [n for n, _ in self.stage.body.named_parameters()]
        return names, [p.detach().clone() for _, p in self.stage.body.named_parameters()]

    def _graph(self, x: Tensor, params: list[Tensor] | None) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Forward of the body with a graph; with ``params``, through those tensors (DDG).
        Also returns the tensors the graph saved (its memory)."""
        inp = x.detach().requires_grad_(self.stage.index > 0)
        saved: list[Tensor] = []

        def pack(t: Tensor) -> Tensor:
            saved.append(t)
            return t

        body = self.stage.body
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self.stage._autocast():
            if params is None:
                out, _ = body(inp, kinetic_grad=False)
            else:
                names = [n for n, _ in body.named_parameters()]
                out, _ = functional_call(
                    body, dict(zip(names, params, strict=True)), (inp,), {"kinetic_grad": False}
                )
        return inp, out, saved

    def forward(self, x: Tensor, time: int) -> Tensor:
        """Forward batch ``time`` (module k < K-1): keep what its delayed gradient will need."""
        stage = self.stage
        x, _ = stage._prepare(x, torch.empty(0, dtype=torch.int64))
        if self.delay > 0:  # kept past this step: own it (a pipeline rank's input slot is reused)
            x = x.clone()
        stage.local_net.train()
        stage.sync_buffers()  # replicas: replica 0's BatchNorm statistics, as DDP's forward does
        stage._buffers_stale = True
        if self.mode == "fr" and self.delay > 0:
            with torch.no_grad(), stage._autocast():
                out, _ = stage.body(x, kinetic_grad=False)
            entry = _Pending(time, x.detach(), stage.num_steps, saved_bytes=_bytes([x]))
        else:
            buffers = [b.detach().clone() for b in stage.body.buffers()] if self.delay > 0 else None
            params = [p.requires_grad_() for p in self._snapshot()[1]] if self.delay > 0 else None
            inp, out, saved = self._graph(x, params)
            held = _bytes([*saved, *(params or []), *(buffers or [])])  # each storage once
            entry = _Pending(time, x.detach(), stage.num_steps, params, buffers, inp, out, held)
        self.pending.append(entry)
        self._account()
        return out.detach()

    def _account(self) -> None:
        held = sum(p.saved_bytes for p in self.pending)
        self.held_bytes_peak = max(self.held_bytes_peak, held)
        self.held_batches_peak = max(self.held_batches_peak, len(self.pending))

    # -- backward ---------------------------------------------------------------------------

    def last_step(self, x: Tensor, y: Tensor, time: int) -> Tensor | None:
        """The last module: loss of batch ``time``, update; returns ∂loss/∂input for module K-2."""
        stage = self.stage
        x, y = stage._prepare(x, y)
        stage.local_net.train()
        stage.sync_buffers()
        inp = x.detach().requires_grad_(stage.index > 0)
        with stage._autocast():
            out, kinetic, logits = stage.local_net(inp, kinetic_grad=False)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=stage.label_smoothing)
        loss = stage.objective.loss(LocalInputs(inp, out, kinetic, logits, ce, y))  # the interface
        stage.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._step(time, time, stage.num_steps, None)
        correct = (logits.detach().argmax(1) == y).sum()
        stage.train_sums.add(loss, ce, kinetic, correct, int(y.shape[0]))
        bad = ~torch.isfinite(loss.detach())
        stage._bad_step = torch.where(bad & (stage._bad_step < 0), stage.num_steps, stage._bad_step)
        stage.last_loss, stage.last_kinetic = loss.detach(), kinetic.detach()
        return inp.grad

    def backward(self, batch: int, grad: Tensor, time: int) -> Tensor | None:
        """Apply the gradient of batch ``batch`` (∂loss/∂output) at step ``time``; returns
        ∂loss/∂input for the module before."""
        stage = self.stage
        entry = self.pending.popleft()
        if entry.step != batch:
            raise RuntimeError(
                f"module {stage.index}: gradient of batch {batch} arrived, batch {entry.step} expected"
            )
        stage.optimizer.zero_grad(set_to_none=True)
        params = list(stage.body.parameters())
        if entry.out is not None:  # DDG: the graph of that step
            assert entry.inp is not None
            entry.out.backward(grad)
            if entry.params is not None:
                for p, snap in zip(params, entry.params, strict=True):
                    p.grad = snap.grad
            version = entry.version
            grad_in = entry.inp.grad
        else:  # FR: replay with the current weights; BatchNorm statistics move only once per batch
            saved = [b.detach().clone() for b in stage.body.buffers()]
            inp, out, _ = self._graph(entry.x, None)
            out.backward(grad)
            with torch.no_grad():
                for b, s in zip(stage.body.buffers(), saved, strict=True):
                    b.copy_(s)
            version = stage.num_steps
            grad_in = inp.grad
        self._step(time, batch, version, grad)
        return grad_in

    def _step(self, time: int, batch: int, version: int, grad_out: Tensor | None) -> None:
        stage = self.stage
        self.average(stage.parameters())
        if self.record:
            grads = [p.grad.detach().clone() for p in stage.body.parameters() if p.grad is not None]
            weights = [p.detach().clone() for p in stage.body.parameters()]
            self.applied.append(Applied(time, batch, version, grads, weights, grad_out))
        stage.optimizer.step()
        stage.scheduler.step()
        stage.num_steps += 1
        stage._buffers_stale = True

    # -- as one rank of a torchrun pipeline -------------------------------------------------
    # ``recv_grad`` blocks for the next message of the backward link from the rank after;
    # ``send_grad`` sends a message on the backward link to the rank before (set by the rank).

    recv_grad: Callable[[], Message] | None = None
    send_grad: Callable[[Message], None] | None = None

    def _next_grad(self) -> tuple[int, Tensor, int]:
        if self.grads:
            return self.grads.popleft()
        assert self.recv_grad is not None
        msg = self.recv_grad()
        if msg.kind is not Kind.TRAIN or msg.x is None:
            raise RuntimeError(f"module {self.stage.index}: expected a gradient, got {msg.kind.name}")
        return msg.step, msg.x.clone(), msg.step + self.delay

    def _send(self, batch: int, grad: Tensor | None, template: Message) -> None:
        if self.send_grad is not None and grad is not None:
            y = torch.zeros(grad.shape[0], dtype=torch.int64)
            self.send_grad(Message(Kind.TRAIN, grad.contiguous(), y, epoch=template.epoch, step=batch))

    def train_message(self, msg: Message) -> Tensor | None:
        """One step of this module in a pipeline rank: forward batch ``msg.step``, apply the
        gradient that is due (waiting for it on the backward link), send ∂loss/∂input back."""
        t = msg.step
        assert msg.x is not None and msg.y is not None
        if self.is_last:
            self._send(t, self.last_step(msg.x, msg.y, t), msg)
            return None
        out = self.forward(msg.x, t)
        if t >= self.delay:
            batch, grad, _ = self._next_grad()
            self._send(batch, self.backward(batch, grad, t), msg)
        return out

    def before_checkpoint(self, msg: Message) -> None:
        """A checkpoint after ``msg.step`` steps: take the gradient already sent to this module but
        not applied yet off the link, so the shard holds what the one-process run holds."""
        if self.recv_grad is not None and not self.is_last and msg.step >= self.delay and not self.grads:
            self.grads.append(self._next_grad())
        if self.gather is not None:  # every replica meets here: replica 0 writes the shard
            self.replica_states = self.gather(self._own_state())[1:]

    # -- checkpoint and summary -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The batches in flight: inputs, and for DDG the weights and buffers of their forward;
        with replicas, replica 0's at the top and the others' under ``replica_states``."""
        state = self._own_state()
        if self.num_replicas > 1:
            state["replica_states"] = self.replica_states
        return state

    def _own_state(self) -> dict[str, Any]:
        return {
            "pending": [
                {
                    "step": p.step,
                    "version": p.version,
                    "x": p.x.cpu(),
                    "params": None if p.params is None else [t.detach().cpu() for t in p.params],
                    "buffers": None if p.buffers is None else [t.cpu() for t in p.buffers],
                }
                for p in self.pending
            ],
            "grads": [(b, g.cpu(), a) for b, g, a in self.grads],
            "held_bytes_peak": self.held_bytes_peak,
            "held_batches_peak": self.held_batches_peak,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the batches in flight; DDG's graphs are recomputed from the saved weights and
        buffers (the live buffers are left as they were)."""
        states = [state, *state.get("replica_states", [])]
        if len(states) != self.num_replicas:
            if any(s["pending"] or s["grads"] for s in states):
                raise CheckpointError(
                    f"the checkpoint was written with pipeline.replicas={len(states)} and holds each "
                    f"replica's own batches in flight on module {self.stage.index}; resume with "
                    f"pipeline.replicas={len(states)}"
                )
            states = [state] * self.num_replicas  # nothing in flight: any number of replicas
        state = states[self.replica]
        device = self.stage.device
        self.pending.clear()
        self.stage.local_net.train()
        for item in state["pending"]:
            x = item["x"].to(device)
            if item["params"] is None:
                self.pending.append(_Pending(item["step"], x, item["version"], saved_bytes=_bytes([x])))
                continue
            params = [t.to(device).requires_grad_() for t in item["params"]]
            buffers = [t.to(device) for t in item["buffers"]]
            live = [b.detach().clone() for b in self.stage.body.buffers()]
            with torch.no_grad():
                for b, s in zip(self.stage.body.buffers(), buffers, strict=True):
                    b.copy_(s)
            inp, out, saved = self._graph(x, params)
            with torch.no_grad():
                for b, s in zip(self.stage.body.buffers(), live, strict=True):
                    b.copy_(s)
            held = _bytes([*saved, *params, *buffers])
            self.pending.append(
                _Pending(
                    item["step"],
                    x,
                    item["version"],
                    params,
                    buffers,
                    inp,
                    out,
                    held,
                )
            )
        self.grads = deque((int(b), g.to(device), int(a)) for b, g, a in state["grads"])
        self.held_bytes_peak = int(state["held_bytes_peak"])
        self.held_batches_peak = int(state["held_batches_peak"])

    def report(self) -> dict[str, Any]:
        """For summary.json: the delay and the memory the batches in flight held at most."""
        return {
            "delay": self.delay,
            "held_batches_peak": self.held_batches_peak,
            "held_bytes_peak": self.held_bytes_peak,
        }


def attach(
    workers: Sequence[StageWorker], mode: str, delays: Sequence[int], record: bool = False
) -> list[DelayedModule]:
    """Give each worker its delayed-gradient side (saved with its checkpoint shard)."""
    k = len(workers)
    carries = [
        DelayedModule(w.stage, mode, d, i == k - 1, record)
        for i, (w, d) in enumerate(zip(workers, delays, strict=True))
    ]
    for worker, carry in zip(workers, carries, strict=True):
        worker.carry = carry
    return carries


def attach_rank(chain: Sequence[StageWorker], cfg: Any, num_modules: int, group: Any = None) -> None:
    """The delayed-gradient side of a pipeline rank's modules (their global indices decide);
    ``group``: the replicas of this rank's stage (the mesh's "dp" group), or None."""
    delays = delays_for(cfg, num_modules)
    for worker in chain:
        i = worker.index
        carry = DelayedModule(worker.stage, cfg.train.regime, delays[i], i == num_modules - 1)
        if group is not None and dist.get_world_size(group) > 1:
            carry.replica, carry.num_replicas = dist.get_rank(group), dist.get_world_size(group)
            carry.average = functools.partial(average_gradients, group=group)
            carry.gather = functools.partial(gather_to_first, group=group)
        worker.carry = carry


def delays_for(cfg: Any, num_modules: int) -> list[int]:
    return paper_delays(num_modules) if cfg.train.delays == "paper" else [0] * num_modules


class DelayedTrainer:
    """One training step of every module at time t, and the gradients in flight between them.

    A gradient module k+1 sends at step t can be applied by module k at step t+1 (the papers'
    one-step link) or, with ``train.delays=none``, at step t.
    """

    def __init__(self, workers: Sequence[StageWorker], carries: Sequence[DelayedModule]) -> None:
        self.workers = list(workers)
        self.carries = list(carries)
        self.latency = [carries[k].delay - carries[k + 1].delay for k in range(len(carries) - 1)]

    def train(self, msg: Message) -> None:
        t = msg.step
        x = msg.x
        assert x is not None and msg.y is not None
        for k, carry in enumerate(self.carries[:-1]):  # timed per module: compute_s in the summary
            with self.workers[k].clock.region(f"train/{k}"):
                x = carry.forward(x, t)
        last = len(self.carries) - 1
        with self.workers[-1].clock.region(f"train/{last}"):
            grad = self.carries[-1].last_step(x, msg.y, t)
        if last > 0:
            assert grad is not None
            self.carries[last - 1].grads.append((t, grad, t + self.latency[last - 1]))
        for k in range(last - 1, -1, -1):
            inbox = self.carries[k].grads
            if not inbox or inbox[0][2] > t:
                continue
            batch, g, _ = inbox.popleft()
            with self.workers[k].clock.region(f"train/{k}"):
                grad_in = self.carries[k].backward(batch, g, t)
            if k > 0:
                assert grad_in is not None
                self.carries[k - 1].grads.append((batch, grad_in, t + self.latency[k - 1]))
        for worker in self.workers:
            worker.train_samples += msg.num_samples
            worker.epoch = msg.epoch
        tail = self.workers[-1]
        if tail.stage.num_steps % tail.log_every_steps == 0:
            tail._log_train()


def run_delayed(
    ctx: RunContext,
    workers: Sequence[StageWorker],
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> DelayedTrainer:
    """The ddg and fr regimes in one process, driven by the parallel regime's message stream.

    The workers carry their :class:`DelayedModule` (:func:`attach`, before any resume).
    """
    carries = [w.carry for w in workers]
    trainer = DelayedTrainer(workers, carries)
    start = Position(progress.epoch, progress.batch, progress.step) if progress else Position()
    for msg in parallel_stream(ctx.cfg, ctx.batches, start, should_stop):
        if msg.kind is Kind.TRAIN:
            trainer.train(msg)
            continue
        for worker in workers:
            msg = worker.handle(msg)
    return trainer
