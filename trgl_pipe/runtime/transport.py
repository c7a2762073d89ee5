"""How messages move between consecutive modules: inboxes and outboxes.

- :func:`local_link`: two threads of one process (the ``sim`` transport).
- :class:`DistOutbox` / :class:`DistInbox`: two torch.distributed ranks. Each message is a small
  header (kind, counters, labels) over a gloo group plus, for batches, the activation over the
  data group (NCCL when each rank has its own GPU, else gloo). Credits flow back over a third
  group. A background thread per inbox receives ahead into pre-allocated slots; a background
  thread per outbox collects credits; sends are non-blocking. The main thread never waits on a
  peer's backward pass, only on data (its input) or credits (room downstream).
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from trgl_pipe.errors import PipelineError
from trgl_pipe.runtime.buffer import CreditGate, Waiter
from trgl_pipe.runtime.messages import Kind, Message

HEADER = 8  # kind, n, epoch, batch, step, split, final, spare; then up to max_batch labels
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class Inbox(Protocol):
    def recv(self, waiter: Waiter) -> Message: ...

    def release(self, msg: Message) -> None: ...

    def close(self, waiter: Waiter) -> None: ...


class Outbox(Protocol):
    gate: CreditGate

    def send(self, msg: Message, waiter: Waiter) -> float: ...

    def close(self, waiter: Waiter) -> None: ...


def _queue_get(q: queue.Queue, timeout: float) -> Any:
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        return None


# ---------------------------------------------------------------------------------------------
# The first module reads its messages from the schedule


class StreamInbox:
    """The first module's inbox: the message stream (time spent here is data loading)."""

    def __init__(self, stream: Iterator[Message]) -> None:
        self._stream = iter(stream)

    def recv(self, waiter: Waiter) -> Message:
        return next(self._stream)

    def release(self, msg: Message) -> None:
        pass

    def close(self, waiter: Waiter) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# In-process link between two threads


class _LocalLink:
    def __init__(self, capacity: int) -> None:
        self.gate = CreditGate(capacity)
        self.ready: queue.Queue = queue.Queue()  # never holds more than `capacity` (credits)


class LocalOutbox:
    def __init__(self, link: _LocalLink, peer: str) -> None:
        self._link = link
        self.gate = link.gate
        self._peer = peer

    def send(self, msg: Message, waiter: Waiter) -> float:
        waited = self.gate.acquire(waiter, f"room in the buffer of {self._peer}")
        self._link.ready.put(msg)
        return waited

    def close(self, waiter: Waiter) -> None:
        pass


class LocalInbox:
    def __init__(self, link: _LocalLink, peer: str) -> None:
        self._link = link
        self._peer = peer

    def recv(self, waiter: Waiter) -> Message:
        return waiter.wait(lambda t: _queue_get(self._link.ready, t), f"a message from {self._peer}")

    def release(self, msg: Message) -> None:
        self._link.gate.release()

    def close(self, waiter: Waiter) -> None:
        pass


def local_link(capacity: int, sender: str, receiver: str) -> tuple[LocalOutbox, LocalInbox]:
    """A bounded buffer of ``capacity`` messages between two threads."""
    link = _LocalLink(capacity)
    return LocalOutbox(link, receiver), LocalInbox(link, sender)


# ---------------------------------------------------------------------------------------------
# torch.distributed link between two ranks


@dataclass(frozen=True)
class PairGroups:
    """The three process groups between ranks k and k+1."""

    header: Any  # gloo: message headers, k -> k+1 (and the one-time shape handshake)
    credit: Any  # gloo: credits, k+1 -> k
    data: Any  # nccl or gloo: activations, k -> k+1


def create_pair_groups(world_size: int, data_backend: str) -> list[PairGroups]:
    """Groups for every pair of consecutive ranks; every rank must call this, in the same order."""
    pairs = []
    for k in range(world_size - 1):
        ranks = [k, k + 1]
        pairs.append(
            PairGroups(
                header=dist.new_group(ranks, backend="gloo"),
                credit=dist.new_group(ranks, backend="gloo"),
                data=dist.new_group(ranks, backend=data_backend),
            )
        )
    return pairs


def _short(error: BaseException) -> str:
    """The first line of an error, without gloo's ``[file.cc:123]`` prefix, at most 160 characters."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", text)[:160]


def _isend(tensor: torch.Tensor, rank: int, peer: int, group: Any) -> Any:
    """A non-blocking send; a peer that is already gone is reported as such."""
    try:
        return dist.isend(tensor, peer, group=group)
    except RuntimeError as error:
        raise PipelineError(f"rank {rank}: lost rank {peer} ({_short(error)})") from error


def _encode_header(msg: Message, max_batch: int) -> torch.Tensor:
    header = torch.zeros(HEADER + max_batch, dtype=torch.int64)
    n = msg.num_samples
    header[:7] = torch.tensor(
        [int(msg.kind), n, msg.epoch, msg.batch, msg.step, msg.split, int(msg.final)],
        dtype=torch.int64,
    )
    if n:
        header[HEADER : HEADER + n] = msg.y
    return header


class _Completer:
    """Waits for non-blocking sends in a background thread, in order, keeping their tensors alive.

    (A gloo send completes only once the peer has posted the matching receive, and its work
    reports completion only through ``wait()``, so waiting is delegated to this thread.)
    """

    def __init__(self, name: str) -> None:
        self._items: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, works: list[Any], tensors: list[torch.Tensor], done: threading.Event | None = None) -> None:
        self._items.put((works, tensors, done))

    def _run(self) -> None:
        while True:
            item = self._items.get()
            if item is None:
                return
            works, _, done = item
            try:
                for work in works:
                    work.wait()
            except Exception as error:
                self.error = error
                return
            finally:
                if done is not None:
                    done.set()

    def close(self, waiter: Waiter, what: str) -> None:
        self._items.put(None)
        waiter.wait(lambda t: True if not self._thread.is_alive() else self._thread.join(t), what)
        if self.error is not None:
            raise PipelineError(f"{waiter.who}: {what} failed ({_short(self.error)})")


class DistOutbox:
    """Rank k's end of the link to rank k+1."""

    def __init__(
        self,
        rank: int,
        peer: int,
        groups: PairGroups,
        capacity: int,
        max_batch: int,
        staged: bool = False,
    ) -> None:
        self.rank = rank
        self.peer = peer
        self.groups = groups
        self.gate = CreditGate(capacity)
        self.max_batch = max_batch
        self.staged = staged  # activations on a GPU but sent by gloo: copy to host first
        self._completer = _Completer(f"sends-to-{peer}")
        self._error: BaseException | None = None
        self._staging: list[torch.Tensor] = []
        self._staging_free: list[threading.Event] = []
        self._num_sent = 0
        self._credit_thread = threading.Thread(
            target=self._collect_credits, name=f"credits-from-{peer}", daemon=True
        )
        self._credit_thread.start()

    def handshake(self, feature_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Tell rank k+1 the shape and dtype of one sample of our output (once)."""
        info = torch.zeros(8, dtype=torch.int64)
        info[0] = len(feature_shape)
        info[1 : 1 + len(feature_shape)] = torch.tensor(feature_shape)
        info[7] = DTYPES.index(dtype)
        dist.send(info, self.peer, group=self.groups.header)
        if self.staged:
            self._staging = [
                torch.empty((self.max_batch, *feature_shape), dtype=dtype).pin_memory()
                for _ in range(self.gate.capacity + 1)
            ]
            self._staging_free = [threading.Event() for _ in self._staging]
            for event in self._staging_free:
                event.set()

    def _collect_credits(self) -> None:
        credit = torch.zeros(1, dtype=torch.int64)
        try:
            while True:
                dist.recv(credit, self.peer, group=self.groups.credit)
                if int(credit) < 0:
                    return
                self.gate.release()
        except Exception as error:
            self._error = PipelineError(f"rank {self.rank}: lost rank {self.peer} ({_short(error)})")

    def send(self, msg: Message, waiter: Waiter) -> float:
        waited = self.gate.acquire(waiter, f"room in the buffer of rank {self.peer}", self._failure)
        header = _encode_header(msg, self.max_batch)
        works = [_isend(header, self.rank, self.peer, self.groups.header)]
        keep = [header]
        done = None
        if msg.kind.has_payload:
            x = msg.x.contiguous()
            if self.staged:
                i = self._num_sent % len(self._staging)
                done = self._staging_free[i]
                t0 = time.perf_counter()
                waiter.wait(lambda t: True if done.wait(t) else None, f"rank {self.peer} to receive")
                waited += time.perf_counter() - t0
                done.clear()
                x = self._staging[i][: x.shape[0]].copy_(x)
            works.append(_isend(x, self.rank, self.peer, self.groups.data))
            keep.append(x)
        self._num_sent += 1
        self._completer.add(works, keep, done)
        return waited

    def _failure(self) -> BaseException | None:
        if self._completer.error is not None:
            return PipelineError(
                f"rank {self.rank}: sending to rank {self.peer} failed ({_short(self._completer.error)})"
            )
        return self._error

    def close(self, waiter: Waiter) -> None:
        """Wait until every send has completed and the receiver's last credit has arrived."""
        self._completer.close(waiter, f"sends to rank {self.peer}")
        waiter.wait(
            lambda t: True if not self._credit_thread.is_alive() else self._credit_thread.join(t),
            f"the last credit from rank {self.peer}",
        )
        if self._error is not None:
            raise self._error


class DistInbox:
    """Rank k+1's end of the link from rank k: receives ahead into ``capacity`` slots."""

    def __init__(
        self,
        rank: int,
        peer: int,
        groups: PairGroups,
        capacity: int,
        max_batch: int,
        device: torch.device,
        staged: bool = False,
    ) -> None:
        self.rank = rank
        self.peer = peer
        self.groups = groups
        self.capacity = capacity
        self.max_batch = max_batch
        self.device = device
        self.staged = staged
        self.on_gpu = device.type == "cuda"
        self._ready: queue.Queue = queue.Queue()
        self._free_slots = threading.Semaphore(capacity)
        self._in_use: deque[int] = deque()
        self._free_events: list[Any] = [None] * capacity
        self._credits = _Completer(f"credits-to-{peer}")
        self._closing = threading.Event()
        self._slots: list[torch.Tensor] = []
        self._thread: threading.Thread | None = None
        self.feature_shape: tuple[int, ...] = ()
        self.dtype = torch.float32

    def handshake(self) -> tuple[tuple[int, ...], torch.dtype]:
        """Receive the sample shape and dtype from rank k, allocate the slots, start receiving."""
        info = torch.zeros(8, dtype=torch.int64)
        dist.recv(info, self.peer, group=self.groups.header)
        ndim = int(info[0])
        self.feature_shape = tuple(int(v) for v in info[1 : 1 + ndim])
        self.dtype = DTYPES[int(info[7])]
        slot_device = self.device if (self.on_gpu and not self.staged) else torch.device("cpu")
        self._slots = [
            torch.empty((self.max_batch, *self.feature_shape), dtype=self.dtype, device=slot_device)
            for _ in range(self.capacity)
        ]
        if self.staged:
            self._slots = [s.pin_memory() for s in self._slots]
        self._stream = torch.cuda.Stream(self.device) if self.on_gpu else None
        # the stream the training loop runs on (this is the main thread)
        self._compute_stream = torch.cuda.current_stream(self.device) if self.on_gpu else None
        self._thread = threading.Thread(target=self._receive, name=f"recv-from-{self.peer}", daemon=True)
        self._thread.start()
        return self.feature_shape, self.dtype

    def _take_slot(self) -> bool:
        while not self._closing.is_set():
            if self._free_slots.acquire(timeout=0.2):
                return True
        return False

    def _receive(self) -> None:
        header = torch.zeros(HEADER + self.max_batch, dtype=torch.int64)
        index = 0
        try:
            while self._take_slot():
                slot = index % self.capacity
                index += 1
                dist.recv(header, self.peer, group=self.groups.header)
                kind, n, epoch, batch, step, split, final = header[:7].tolist()
                y = header[HEADER : HEADER + n].clone() if n else None
                x, ready = None, None
                if Kind(kind).has_payload:
                    x, ready = self._receive_payload(slot, n)
                msg = Message(
                    Kind(kind),
                    x,
                    y,
                    epoch=epoch,
                    batch=batch,
                    step=step,
                    split=split,
                    final=bool(final),
                )
                self._ready.put((msg, slot, ready))
                if kind == Kind.STOP:
                    return
        except Exception as error:
            self._ready.put(PipelineError(f"rank {self.rank}: lost rank {self.peer} ({_short(error)})"))

    def _receive_payload(self, slot: int, n: int) -> tuple[torch.Tensor, Any]:
        view = self._slots[slot][:n]
        if self._stream is None:  # CPU ranks
            dist.recv(view, self.peer, group=self.groups.data)
            return view, None
        with torch.cuda.stream(self._stream):
            if self.staged:  # gloo into pinned host memory, then to this rank's GPU
                dist.recv(view, self.peer, group=self.groups.data)
                x = view.to(self.device, non_blocking=True)
                self._stream.synchronize()  # the host slot may be reused once this returns
                x.record_stream(self._compute_stream)  # keep its memory until the training loop is done
                return x, None
            if self._free_events[slot] is not None:  # the compute that read this slot is done
                self._stream.wait_event(self._free_events[slot])
            dist.irecv(view, self.peer, group=self.groups.data).wait()
            ready = torch.cuda.Event()
            ready.record(self._stream)
            return view, ready

    def recv(self, waiter: Waiter) -> Message:
        item = waiter.wait(lambda t: _queue_get(self._ready, t), f"a message from rank {self.peer}")
        if isinstance(item, BaseException):
            raise item
        msg, slot, ready = item
        if ready is not None:
            self._compute_stream.wait_event(ready)
        self._in_use.append(slot)
        return msg

    def release(self, msg: Message) -> None:
        """The message is consumed: free its slot and give rank k a credit (the last one: -1)."""
        slot = self._in_use.popleft()
        if self.on_gpu and not self.staged:
            event = torch.cuda.Event()
            event.record(self._compute_stream)
            self._free_events[slot] = event
        self._free_slots.release()
        credit = torch.tensor([-1 if msg.kind is Kind.STOP else 0], dtype=torch.int64)
        self._credits.add([_isend(credit, self.rank, self.peer, self.groups.credit)], [credit])

    def close(self, waiter: Waiter) -> None:
        self._closing.set()
        self._credits.close(waiter, f"credits to rank {self.peer}")
        if self._thread is not None:
            waiter.wait(
                lambda t: True if not self._thread.is_alive() else self._thread.join(t),
                "the receive thread to finish",
            )
