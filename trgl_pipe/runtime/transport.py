"""How messages move between consecutive modules: inboxes and outboxes.

- :func:`local_link`: two threads of one process (the ``sim`` transport).
- :class:`DistOutbox` / :class:`DistInbox`: two torch.distributed ranks of the mesh's "pp" group.
  Each message is a small header (kind, counters, labels; a CPU tensor, so gloo carries it) plus,
  for batches, the activation (NCCL when each rank has its own GPU, else gloo); on a host link
  whose activations are small (:func:`packs`) both travel as one gloo message.
  The buffer is bounded without credit messages: the receiver keeps a header receive posted in
  each of its ``capacity`` free slots (it posts a slot's again once the message in it is
  consumed), a gloo send completes only once its receive is posted, and a sender waits for its
  previous message to land before it sends the next. So a sender is at most ``capacity``
  messages ahead of its receiver, plus the one it is sending. A background thread per inbox
  waits for the messages in order; a background thread per outbox waits for the sends to
  complete. Each background thread waits on a CUDA stream of its own, never on the training
  stream (see :func:`side_stream`), and activations travel in the layout the modules compute in.
  The main thread never waits on a peer's backward pass, only on data (its input) or on its
  previous message landing (room downstream). Every wait on a peer ends after
  ``pipeline.timeout_s``.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from trgl_pipe.errors import PipelineError
from trgl_pipe.runtime.buffer import Occupancy, Waiter
from trgl_pipe.runtime.messages import Kind, Message

HEADER = 8  # kind, n, epoch, batch, step, split, final, preempted; then up to max_batch labels
HEADER_TAG, DATA_TAG = 1, 2  # (tag 3 carried credits before the receives posted ahead replaced them)
IMAGE_TAG = 4  # a training batch's input image, after its activation, when a later rank reads it
# the backward link of the delayed-gradient regimes (gradients from rank k+1 to rank k): its own
# streams, so it never mixes with the forward link between the same two ranks
BACKWARD_TAGS = (5, 6)
INFO = 9  # the handshake: ndim, up to 6 sizes, dtype, channels_last
# Waits that may legitimately last long: the handshake (a neighbour may still be reading data or
# compiling) and the next header (the main thread bounds these by pipeline.timeout_s from the
# moment it needs them; a dead peer ends them at once by closing its connection).
STARTUP_TIMEOUT = timedelta(seconds=900)
IDLE_TIMEOUT = timedelta(days=7)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# A host link whose largest activation is at most this many bytes sends header and activation as
# one gloo message (the activation copied behind the header into the outbox's buffer): one gloo
# operation and one rendezvous fewer. Measured (benchmarks/README.md section 9, receives posted
# ahead, K = 2 and 4, buffers 2 and 8, medians of 5 repeats): packed 0.39-0.53 of the raw link up
# to 64 KiB against 0.20-0.40 apart; at 1 MiB 0.62-0.84 against 0.54-0.77; at 4 MiB level (K = 2)
# or slower (K = 4: 0.71-0.74 against 0.77-0.78), at 16 MiB 0.73-0.86 against 0.87-0.94: the
# copy costs more than the rendezvous saves.
PACK_LIMIT = 1 << 20


class Inbox(Protocol):
    gate: Occupancy | None  # the buffer's statistics (None: the first module reads no link)

    def recv(self, waiter: Waiter) -> Message: ...

    def release(self, msg: Message) -> None: ...

    def close(self, waiter: Waiter) -> None: ...


class Outbox(Protocol):
    def send(self, msg: Message, waiter: Waiter) -> float: ...

    def close(self, waiter: Waiter) -> None: ...


def _queue_get(q: queue.SimpleQueue, timeout: float) -> Any:
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        return None


# ---------------------------------------------------------------------------------------------
# The first module reads its messages from the schedule


class StreamInbox:
    """The first module's inbox: the message stream (time spent here is data loading)."""

    gate = None

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


class _LocalLink(Occupancy):
    """A bounded buffer between two threads: one lock, a condition each way, and its occupancy
    (``inbox.gate``, observed as each message is taken, as between ranks). A send takes room, a
    release gives it back once the message is consumed."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._ready = threading.Condition(self._lock)
        self._messages: deque[Message] = deque()
        self._sent = 0
        self._consumed = 0
        self._waiting = 0  # threads inside a wait: only then is a notify needed

    @property
    def in_flight(self) -> int:
        """Messages sent and not yet consumed."""
        return self._sent - self._consumed

    def put(self, msg: Message, waiter: Waiter, what: str) -> float:
        """Add ``msg`` once there is room; returns the seconds waited for it."""
        waited = 0.0
        with self._lock:
            if self.in_flight >= self.capacity:
                t0 = time.perf_counter()
                self._wait(waiter, self._room, self._has_room, what)
                waited = time.perf_counter() - t0
            self._sent += 1
            self._messages.append(msg)
            if self._waiting:
                self._ready.notify()
        return waited

    def take(self, waiter: Waiter, what: str) -> Message:
        with self._lock:
            if not self._messages:
                self._wait(waiter, self._ready, self._has_message, what)
            self.observe(self.in_flight)
            return self._messages.popleft()

    def release(self) -> None:
        with self._lock:
            self._consumed += 1
            if self._waiting:
                self._room.notify()

    def _wait(
        self, waiter: Waiter, condition: threading.Condition, ready: Callable[[], bool], what: str
    ) -> None:
        """Wait (the lock held) until ``ready()``, within the waiter's timeout and abort checks."""
        self._waiting += 1
        try:
            waiter.wait(lambda t: condition.wait_for(ready, t) or None, what)
        finally:
            self._waiting -= 1

    def _has_room(self) -> bool:
        return self.in_flight < self.capacity

    def _has_message(self) -> bool:
        return bool(self._messages)


class LocalOutbox:
    def __init__(self, link: _LocalLink, peer: str) -> None:
        self._link = link
        self._what = f"room in the buffer of {peer}"

    def send(self, msg: Message, waiter: Waiter) -> float:
        return self._link.put(msg, waiter, self._what)

    def close(self, waiter: Waiter) -> None:
        pass


class LocalInbox:
    def __init__(self, link: _LocalLink, peer: str) -> None:
        self._link = link
        self.gate = link  # the buffer's statistics (capacity, in_flight, mean_occupancy)
        self._what = f"a message from {peer}"

    def recv(self, waiter: Waiter) -> Message:
        return self._link.take(waiter, self._what)

    def release(self, msg: Message) -> None:
        self._link.release()

    def close(self, waiter: Waiter) -> None:
        pass


def local_link(capacity: int, sender: str, receiver: str) -> tuple[LocalOutbox, LocalInbox]:
    """A bounded buffer of ``capacity`` messages between two threads."""
    link = _LocalLink(capacity)
    return LocalOutbox(link, receiver), LocalInbox(link, sender)


# ---------------------------------------------------------------------------------------------
# torch.distributed link between two ranks


def _short(error: BaseException) -> str:
    """The first line of an error, without gloo's ``[file.cc:123]`` prefix, at most 160 characters."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", text)[:160]


def _isend(tensor: torch.Tensor, rank: int, peer: int, group: Any, tag: int) -> Any:
    """A non-blocking send; a peer that is already gone is reported as such."""
    try:
        return dist.isend(tensor, peer, group=group, tag=tag)
    except RuntimeError as error:
        raise PipelineError(f"rank {rank}: lost rank {peer} ({_short(error)})") from error


def use_device(device: torch.device) -> None:
    """Make ``device`` current in this thread: a thread starts on GPU 0, and touching CUDA there
    would create a context on GPU 0 for every rank."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _encode_info(feature_shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """The handshake: ndim, the shape of one sample (up to 6 dimensions), dtype, layout."""
    info = torch.zeros(INFO, dtype=torch.int64)
    info[0] = len(feature_shape)
    info[1 : 1 + len(feature_shape)] = torch.tensor(feature_shape)
    info[7] = DTYPES.index(dtype)
    info[8] = int(channels_last)
    return info


def _decode_info(info: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype, bool]:
    ndim = int(info[0])
    return tuple(int(v) for v in info[1 : 1 + ndim]), DTYPES[int(info[7])], bool(info[8])


def to_wire(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` as the contiguous tensor a backend sends (gloo and NCCL take contiguous tensors only):
    a channels_last activation is sent as its NHWC view, the same memory, so nothing is copied."""
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    return x.contiguous()


def from_wire(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The activation a received wire tensor holds (channels_last again, without a copy)."""
    return t.permute(0, 3, 1, 2) if channels_last else t


def _wire_shape(feature_shape: tuple[int, ...], channels_last: bool) -> tuple[int, ...]:
    if channels_last:
        c, h, w = feature_shape
        return (h, w, c)
    return feature_shape


def side_stream(device: torch.device) -> contextlib.AbstractContextManager:
    """Make a new stream of ``device`` this thread's current one (nothing on a CPU).

    A background thread of the runtime must never make the training stream wait: an NCCL work's
    ``wait()`` first makes the calling thread's *current* stream wait for the transfer, and a
    thread's current stream is the device's default one, the stream training runs on. Inside
    this context that wait lands on a side stream instead. ``torch.cuda.Stream`` hands out the
    streams of torch's pool in turn, so two helper threads may share one (their waits then order
    each other, which is harmless); it is never the default stream training runs on.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device))


def _header_bytes(max_batch: int) -> int:
    """Bytes of a header: :data:`HEADER` values, then room for ``max_batch`` labels (int64)."""
    return (HEADER + max_batch) * 8


def _encode_header(msg: Message, max_batch: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The header of ``msg``, written into ``out`` (its HEADER + max_batch int64 values) if given."""
    header = torch.zeros(HEADER + max_batch, dtype=torch.int64) if out is None else out.zero_()
    n = msg.num_samples
    header[:HEADER] = torch.tensor(
        [int(msg.kind), n, msg.epoch, msg.batch, msg.step, msg.split, int(msg.final), int(msg.preempted)],
        dtype=torch.int64,
    )
    if n:
        header[HEADER : HEADER + n] = msg.y
    return header


def packs(feature_shape: tuple[int, ...], dtype: torch.dtype, max_batch: int, wire: torch.device) -> bool:
    """Whether a link sends each message as one packed buffer (header, then activation bytes):
    host links (gloo) whose largest activation is at most :data:`PACK_LIMIT` bytes. Both ends
    decide it from the handshake, so they agree."""
    return wire.type == "cpu" and max_batch * _sample_bytes(feature_shape, dtype) <= PACK_LIMIT


def _sample_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def _pack(
    msg: Message, max_batch: int, x: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The header of ``msg`` and its activation ``x`` (contiguous) in one byte buffer: what a
    packing link sends; written into the start of ``out`` (bytes) if given, else a new buffer.
    The header is encoded in place, so it is written once."""
    start = _header_bytes(max_batch)
    size = start + (0 if x is None else x.nbytes)
    packed = torch.empty(size, dtype=torch.uint8) if out is None else out[:size]
    _encode_header(msg, max_batch, out=packed[:start].view(torch.int64))
    if x is not None and x.numel():
        packed[start:] = x.reshape(-1).view(torch.uint8)
    return packed


def _decode_header(header: torch.Tensor) -> Message:
    """The message a header describes, without its activation. A message with a payload always
    has labels, an empty evaluation shard's too (zero of them), so a module never sees None."""
    kind, n, epoch, batch, step, split, final, preempted = header[:HEADER].tolist()
    kind = Kind(kind)
    y = header[HEADER : HEADER + n].clone() if kind.has_payload else None
    return Message(
        kind,
        None,
        y,
        epoch=epoch,
        batch=batch,
        step=step,
        split=split,
        final=bool(final),
        preempted=bool(preempted),
    )


class StagingBuffers:
    """Host buffers that activations of a GPU pass through when gloo carries them (ranks sharing a
    GPU): buffer i is free again once the send that used it has completed.

    A failed send stops the completer thread, so later buffers would never be freed: the wait
    for a buffer therefore checks ``failure()`` as it polls and raises that error at once,
    instead of timing out ``pipeline.timeout_s`` later with a misleading message.
    """

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        self.buffers = buffers
        self.free = [threading.Event() for _ in buffers]
        for event in self.free:
            event.set()

    def __len__(self) -> int:
        return len(self.buffers)

    def take(
        self, i: int, waiter: Waiter, failure: Callable[[], BaseException | None], what: str
    ) -> tuple[torch.Tensor, threading.Event]:
        """Buffer ``i`` once its previous send has completed; its event, to set when this one has."""
        done = self.free[i]

        def attempt(timeout: float) -> bool | None:
            ready = done.wait(timeout)
            error = failure()
            if error is not None:  # the completer sets `done` also when its send fails
                raise error
            return True if ready else None

        waiter.wait(attempt, what)
        done.clear()
        return self.buffers[i], done


class _Completer:
    """Waits for non-blocking sends in a background thread, in order, keeping their tensors alive.

    A gloo send completes only once the peer has posted the matching receive, and an NCCL work's
    plain ``wait()`` returns at once on the host; waiting with a timeout blocks this thread until
    the transfer is done. A send may wait long for a slow receiver: the sender's main thread
    bounds that wait by ``pipeline.timeout_s`` (:meth:`DistOutbox.send`, ``close``), so this
    thread's own limit is :data:`IDLE_TIMEOUT` and never races the main thread's (a gloo wait
    that times out closes the connection, and its error would hide the one naming the peer).
    The thread waits on a stream of its own (:func:`side_stream`), never on the training stream.
    ``later`` starts a send from this thread once its data is ready (a host-staged copy).
    """

    def __init__(self, name: str, device: torch.device) -> None:
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.device = device
        self.timeout = IDLE_TIMEOUT
        self.stream: Any = None  # the stream the thread waits on (CUDA only), set once it runs
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(
        self,
        works: list[Any],
        tensors: list[torch.Tensor],
        done: Sequence[threading.Event] = (),
        later: Callable[[], Any] | None = None,
    ) -> None:
        """Wait for ``works`` (then ``later()``'s) in order; set every event of ``done`` after."""
        self._items.put((works, tensors, done, later))

    def _run(self) -> None:
        use_device(self.device)
        with side_stream(self.device):
            if self.device.type == "cuda":
                self.stream = torch.cuda.current_stream(self.device)
            self._complete()

    def _complete(self) -> None:
        while True:
            item = self._items.get()
            if item is None:
                return
            works, _, done, later = item
            try:
                if later is not None:
                    works = [*works, later()]
                for work in works:
                    work.wait(self.timeout)
            except Exception as error:
                self.error = error
                return
            finally:
                for event in done:
                    event.set()

    def close(self, waiter: Waiter, what: str) -> None:
        self._items.put(None)
        waiter.wait(lambda t: True if not self._thread.is_alive() else self._thread.join(t), what)
        if self.error is not None:
            raise PipelineError(f"{waiter.who}: {what} failed ({_short(self.error)})")


def wire_device(device: torch.device, staged: bool) -> torch.device:
    """Where a payload (activation, image, gradient) must be when handed to the backend.

    The ``cpu:gloo,cuda:nccl`` group routes a tensor by its device: a CPU tensor goes over gloo,
    a CUDA one over NCCL. Both ends must agree, or a receive matches the wrong send (NCCL ignores
    tags). So every payload of a link with a GPU of its own (NCCL) is sent from and received into
    that GPU, whatever device it was made on (the first rank's image is the host batch); a link
    whose ranks share a GPU (``staged``) or a CPU link sends host tensors. Headers and credits are
    always host tensors (gloo).
    """
    return torch.device("cpu") if staged or device.type == "cpu" else device


@dataclass(frozen=True)
class LinkSettings:
    """What both ends of every link of a rank share: the process group the peers are ranks of, the
    slots per link, the largest batch, the device, the timeout of every wait, and whether GPU
    tensors go through host memory (``staged``: gloo between ranks that share a GPU)."""

    group: Any
    capacity: int
    max_batch: int
    device: torch.device
    timeout_s: float
    staged: bool = False

    @property
    def wire(self) -> torch.device:
        """The device of every payload on this link (:func:`wire_device`)."""
        return wire_device(self.device, self.staged)


class DistOutbox:
    """Rank k's end of the link to the rank after it (``peer``, a global rank of ``link.group``).

    No credits: a send completes only once the receiver has posted its receive, which it does for
    each free slot (:class:`DistInbox`), and :meth:`send` first waits for the previous message's
    sends to complete. ``close`` fills the receives the receiver still has posted after the STOP
    (``capacity`` - 1 of them, see :meth:`DistInbox.release`), so no receive outlives the link.
    """

    def __init__(
        self,
        rank: int,
        peer: int,
        link: LinkSettings,
        tags: tuple[int, int] = (HEADER_TAG, DATA_TAG),
    ) -> None:
        self.rank = rank
        self.peer = peer
        self.group = link.group
        self.tags = tags
        self.capacity = link.capacity
        self.max_batch = link.max_batch
        self.device = link.device
        self.staged = link.staged  # activations on a GPU but sent by gloo: copy to host first
        self.wire = link.wire
        self._completer = _Completer(f"sends-to-{peer}", link.device)
        # set once the previous message's sends have completed (it has landed); one at a time
        self._landed = threading.Event()
        self._landed.set()
        # what a message is written into: free again once it has landed, before the next is built
        self._header = torch.zeros(HEADER + self.max_batch, dtype=torch.int64)
        self._packed: torch.Tensor | None = None  # header and activation, when the link packs
        self._staging: StagingBuffers | None = None
        self._copy_stream: Any = None
        self._copied: list[Any] = []
        self.channels_last = False  # activations travel as their NHWC view
        self._num_sent = 0
        self._stopped = False  # the STOP was sent
        self._packs = False  # header and activation in one message (set by the handshake)
        self.sent_bytes = 0  # activations sent (headers not counted)
        self.image_sent_bytes = 0  # input images sent with training batches

    def handshake(
        self, feature_shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool = False
    ) -> None:
        """Tell the next rank the shape, dtype and memory layout of one sample of our output (once).

        Activations travel in the layout the modules compute in (channels_last or not), so
        neither end copies them into another layout.
        """
        self.channels_last = channels_last
        self._packs = not self.staged and packs(feature_shape, dtype, self.max_batch, self.wire)
        if self._packs:
            wire_bytes = self.max_batch * _sample_bytes(_wire_shape(feature_shape, channels_last), dtype)
            self._packed = torch.empty(_header_bytes(self.max_batch) + wire_bytes, dtype=torch.uint8)
        dist.isend(
            _encode_info(feature_shape, dtype, channels_last), self.peer, group=self.group, tag=self.tags[0]
        ).wait(STARTUP_TIMEOUT)
        if self.staged:  # capacity + 1 buffers, as the memory accounting counts them
            self._staging = StagingBuffers(
                [
                    torch.empty(
                        (self.max_batch, *_wire_shape(feature_shape, channels_last)), dtype=dtype
                    ).pin_memory()
                    for _ in range(self.capacity + 1)
                ]
            )
            self._copy_stream = torch.cuda.Stream(self.device)
            self._copied = [torch.cuda.Event() for _ in range(len(self._staging))]

    def _wait_landed(self, waiter: Waiter) -> float:
        """Wait until the previous message has landed in a slot of the receiver (its sends have
        completed): the receiver's room, without a credit. Returns the seconds waited."""
        landed = self._landed
        if landed.is_set():
            return 0.0
        t0 = time.perf_counter()

        def attempt(timeout: float) -> bool | None:
            ready = landed.wait(timeout)
            failure = self._failure()
            if failure is not None:  # the completer sets the event also when a send fails
                raise failure
            return True if ready else None

        waiter.wait(attempt, f"room in the buffer of rank {self.peer}")
        return time.perf_counter() - t0

    def send(self, msg: Message, waiter: Waiter) -> float:
        """Send ``msg`` once the previous message has landed; returns the seconds waited."""
        waited = self._wait_landed(waiter)
        failure = self._failure()
        if failure is not None:
            raise failure
        landed = self._landed
        landed.clear()
        if self._packs:
            self._send_packed(msg, landed)
        else:
            waited += self._send_apart(msg, waiter, landed)
        self._num_sent += 1
        self._stopped = msg.kind is Kind.STOP
        return waited

    def _send_apart(self, msg: Message, waiter: Waiter, landed: threading.Event) -> float:
        """The header, then the activation (and the image) on their own tags."""
        waited = 0.0
        header = _encode_header(msg, self.max_batch, out=self._header)
        works = [_isend(header, self.rank, self.peer, self.group, self.tags[0])]
        keep = [header]
        done, later = [landed], None
        if msg.kind.has_payload:
            x = to_wire(msg.x, self.channels_last)  # no copy when in the agreed layout
            if self._staging is not None and x.shape[0]:
                t0 = time.perf_counter()
                i = self._num_sent % len(self._staging)
                buffer, free = self._staging.take(i, waiter, self._failure, f"rank {self.peer} to receive")
                waited += time.perf_counter() - t0
                done.append(free)
                later = self._stage(x, buffer[: x.shape[0]], self._copied[i])
            elif x.shape[0]:  # an empty evaluation shard sends its header only
                x = self._on_wire(x)
                works.append(_isend(x, self.rank, self.peer, self.group, self.tags[1]))
                self.sent_bytes += x.numel() * x.element_size()
            keep.append(x)
            self._send_image(msg, x.shape[0], works, keep)
        self._completer.add(works, keep, done, later)
        return waited

    def _send_packed(self, msg: Message, landed: threading.Event) -> None:
        """One message: the header with the activation behind it (see :func:`packs`); a training
        batch's image, when the receiver reads it, follows on its own tag."""
        x = to_wire(msg.x, self.channels_last) if msg.kind.has_payload else None
        packed = _pack(msg, self.max_batch, x, out=self._packed)
        works, keep = [_isend(packed, self.rank, self.peer, self.group, self.tags[0])], [packed]
        if x is not None:
            self.sent_bytes += x.numel() * x.element_size()
            self._send_image(msg, x.shape[0], works, keep)
        self._completer.add(works, keep, [landed])

    def _send_image(self, msg: Message, n: int, works: list[Any], keep: list[torch.Tensor]) -> None:
        """A training batch's input image after its activation, when it carries one and is not
        empty (the receiver expects it by the same rule: :meth:`DistInbox._expects_image`)."""
        if msg.image is None or not n:
            return
        # the first rank's image is the host batch: on an NCCL link it must go to the GPU
        image = self._on_wire(msg.image.contiguous())
        works.append(_isend(image, self.rank, self.peer, self.group, IMAGE_TAG))
        self.image_sent_bytes += image.numel() * image.element_size()
        keep.append(image)

    def _on_wire(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the link's wire device. A host-to-GPU copy is ordered on the stream before the
        send; a GPU-to-host copy must be complete before gloo reads it, so that one blocks."""
        if t.device == self.wire:
            return t
        return t.to(self.wire, non_blocking=self.wire.type != "cpu")

    def _stage(self, x: torch.Tensor, host: torch.Tensor, copied: Any) -> Callable[[], Any]:
        """Copy ``x`` to pinned ``host`` memory on a side stream without the host waiting; returns
        what the completer thread calls to send it once the copy is done."""
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # x is computed
        with torch.cuda.stream(self._copy_stream):
            host.copy_(x, non_blocking=True)
            copied.record(self._copy_stream)
        x.record_stream(self._copy_stream)

        def send() -> Any:
            copied.synchronize()
            return _isend(host, self.rank, self.peer, self.group, self.tags[1])

        return send

    def _failure(self) -> BaseException | None:
        if self._completer.error is not None:
            return PipelineError(
                f"rank {self.rank}: sending to rank {self.peer} failed ({_short(self._completer.error)})"
            )
        return None

    def close(self, waiter: Waiter) -> None:
        """After the STOP: fill the receives the receiver still has posted, then wait until every
        send has completed."""
        if self._stopped:  # the receiver posted capacity - 1 receives after the STOP's
            filler = torch.zeros(1, dtype=torch.int64)
            tag = self.tags[0]
            works = [_isend(filler, self.rank, self.peer, self.group, tag) for _ in range(self.capacity - 1)]
            self._completer.add(works, [filler])
        self._completer.close(waiter, f"sends to rank {self.peer}")


class DistInbox:
    """The receiving end of the link from rank ``peer``: ``capacity`` slots, each with a header
    receive posted while it is free; the posted receives are the sender's room (no credits)."""

    def __init__(
        self,
        rank: int,
        peer: int,
        link: LinkSettings,
        image_shape: tuple[int, ...] | None = None,
        tags: tuple[int, int] = (HEADER_TAG, DATA_TAG),
    ) -> None:
        self.rank = rank
        self.peer = peer
        self.group = link.group
        self.image_shape = image_shape  # training batches bring their image (a later module reads it)
        self.tags = tags
        self.capacity = link.capacity
        self.max_batch = link.max_batch
        self.device = link.device
        self.timeout = timedelta(seconds=link.timeout_s)
        self.staged = link.staged
        self.wire = link.wire  # where payloads arrive (the sender's rule, :func:`wire_device`)
        self.on_gpu = link.device.type == "cuda"
        self.gate = Occupancy(link.capacity)  # the buffer's statistics, counted as messages are taken
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # (message, slot, arrival event) in order
        self._posted: queue.SimpleQueue = queue.SimpleQueue()  # (header receive, slot) in order
        self._in_use: deque[int] = deque()
        self._used = [False] * link.capacity  # a slot's `consumed` event has been recorded
        self._arrived: list[Any] = []
        self._consumed: list[Any] = []
        self._closing = threading.Event()
        self._slots: list[torch.Tensor] = []
        self._headers: list[torch.Tensor] = []  # one per slot when header and activation travel apart
        self._stream: Any = None  # the stream receives are waited on (CUDA only)
        self._compute_stream: Any = None
        self._thread: threading.Thread | None = None
        self.feature_shape: tuple[int, ...] = ()
        self.dtype = torch.float32
        self.channels_last = False  # activations arrive as their NHWC view
        self._packs = False  # header and activation arrive as one message (:func:`packs`)

    def handshake(self) -> tuple[tuple[int, ...], torch.dtype]:
        """Receive the sample shape and dtype, allocate the slots, post their receives, start
        waiting for them."""
        info = torch.zeros(INFO, dtype=torch.int64)
        dist.irecv(info, self.peer, group=self.group, tag=self.tags[0]).wait(STARTUP_TIMEOUT)
        self.feature_shape, self.dtype, self.channels_last = _decode_info(info)
        self._packs = not self.staged and packs(self.feature_shape, self.dtype, self.max_batch, self.wire)
        self._slots = self._allocate_slots()
        if not self._packs:
            self._headers = [
                torch.zeros(HEADER + self.max_batch, dtype=torch.int64) for _ in range(self.capacity)
            ]
        self._stream = torch.cuda.Stream(self.device) if self.on_gpu else None
        # the stream the training loop runs on (this is the main thread)
        self._compute_stream = torch.cuda.current_stream(self.device) if self.on_gpu else None
        # one event per slot, made once: "the data has arrived" and "the compute that read it is done"
        self._arrived = [torch.cuda.Event() for _ in range(self.capacity)] if self.on_gpu else []
        self._consumed = [torch.cuda.Event() for _ in range(self.capacity)] if self.on_gpu else []
        for slot in range(self.capacity):
            self._post(slot)
        self._thread = threading.Thread(target=self._receive, name=f"recv-from-{self.peer}", daemon=True)
        self._thread.start()
        return self.feature_shape, self.dtype

    def _allocate_slots(self) -> list[torch.Tensor]:
        """One receive slot per message of the buffer, of the largest batch, on the link's wire device."""
        wire_shape = _wire_shape(self.feature_shape, self.channels_last)
        if self._packs:  # the header's bytes, then the activation's
            size = _header_bytes(self.max_batch) + self.max_batch * _sample_bytes(wire_shape, self.dtype)
            return [torch.empty(size, dtype=torch.uint8) for _ in range(self.capacity)]
        slots = [
            torch.empty((self.max_batch, *wire_shape), dtype=self.dtype, device=self.wire)
            for _ in range(self.capacity)
        ]
        return [s.pin_memory() for s in slots] if self.staged else slots

    @property
    def slot_bytes(self) -> int:
        """Bytes of this inbox's receive slots for activations (what :func:`slot_samples` sizes them
        for; the headers a packing link receives with them are not counted)."""
        headers = _header_bytes(self.max_batch) * len(self._slots) if self._packs else 0
        return sum(s.nbytes for s in self._slots) - headers

    def _post(self, slot: int) -> None:
        """Post the receive of the next message into free ``slot`` (its header, or the packed
        message): this is the sender's room for one more message."""
        buffer = self._slots[slot] if self._packs else self._headers[slot]
        work = dist.irecv(buffer, self.peer, group=self.group, tag=self.tags[0])
        self._posted.put((work, slot))

    def _next_posted(self) -> tuple[Any, int] | None:
        """The oldest posted receive; None once none is left and the inbox is closing."""
        while True:
            try:
                return self._posted.get(timeout=0.2)
            except queue.Empty:
                if self._closing.is_set():
                    return None

    def _receive(self) -> None:
        use_device(self.device)
        fillers = -1  # after the STOP: the sender's fillers of the receives still posted
        try:
            while fillers != 0:
                posted = self._next_posted()
                if posted is None:
                    return
                work, slot = posted
                work.wait(IDLE_TIMEOUT)
                if fillers > 0:
                    fillers -= 1
                    continue
                msg, ready = self._arrival(slot)
                self._ready.put((msg, slot, ready))
                if msg.kind is Kind.STOP:
                    fillers = self.capacity - 1
        except Exception as error:
            self._ready.put(PipelineError(f"rank {self.rank}: lost rank {self.peer} ({_short(error)})"))

    def _arrival(self, slot: int) -> tuple[Message, Any]:
        """The message whose header (or packed whole) has arrived in ``slot``, with its payload
        received; and, on an NCCL link, the event its arrival is recorded on."""
        if self._packs:
            return self._unpack(slot), None
        msg, ready = _decode_header(self._headers[slot]), None
        if self.on_gpu and msg.y is not None:
            msg.y = msg.y.pin_memory()  # the stage's copy to the GPU then does not block
        if msg.kind.has_payload:
            n = msg.num_samples
            x, ready, image = self._receive_payload(slot, n, self._expects_image(msg))
            msg.x = from_wire(x, self.channels_last)
            msg.image = image
        return msg, ready

    def _unpack(self, slot: int) -> Message:
        """A packed message (see :func:`packs`): the activation is a view of the slot's bytes
        behind the header; a training batch's image follows on its own tag."""
        buffer = self._slots[slot]
        start = _header_bytes(self.max_batch)
        msg = _decode_header(buffer[:start].view(torch.int64))
        if msg.kind.has_payload:
            n = msg.num_samples
            wire_shape = _wire_shape(self.feature_shape, self.channels_last)
            size = n * _sample_bytes(wire_shape, self.dtype)
            x = buffer[start : start + size].view(self.dtype).view(n, *wire_shape)
            msg.x = from_wire(x, self.channels_last)
            if self._expects_image(msg):
                msg.image = self._receive_image(n, self.wire)
        return msg

    def _expects_image(self, msg: Message) -> bool:
        """A non-empty training batch brings its input image when a module here or later reads
        it (the sender's rule: :meth:`DistOutbox._send_image`)."""
        return self.image_shape is not None and msg.kind is Kind.TRAIN and msg.num_samples > 0

    def _receive_image(self, n: int, device: torch.device) -> torch.Tensor:
        """A training batch's image, into a tensor of its own (it is read after the slot's reuse)."""
        image = torch.empty((n, *self.image_shape), dtype=torch.float32, device=device)
        if self.on_gpu and device.type == "cpu":
            image = image.pin_memory()  # so the copy to the GPU does not block the host
        dist.irecv(image, self.peer, group=self.group, tag=IMAGE_TAG).wait(self.timeout)
        return image

    def _receive_payload(self, slot: int, n: int, with_image: bool = False) -> tuple[torch.Tensor, Any, Any]:
        view = self._slots[slot][:n]
        if n == 0:  # an empty evaluation shard: no data follows its header
            return (view.to(self.device, non_blocking=True) if self.staged else view), None, None
        if self._stream is None:  # CPU ranks
            dist.irecv(view, self.peer, group=self.group, tag=self.tags[1]).wait(self.timeout)
            return view, None, self._receive_image(n, self.wire) if with_image else None
        with torch.cuda.stream(self._stream):
            image = None
            if self.staged:  # gloo into pinned host memory, then to this rank's GPU
                dist.irecv(view, self.peer, group=self.group, tag=self.tags[1]).wait(self.timeout)
                x = view.to(self.device, non_blocking=True)
                if with_image:  # stays on the host: the stage copies it when it reads it, the
                    # outbox passes it on as it is (no copy back from the GPU each step)
                    image = self._receive_image(n, self.wire)
                self._stream.synchronize()  # the host slot may be reused once this returns
                x.record_stream(self._compute_stream)  # keep its memory until the training loop is done
                return x, None, image
            if self._used[slot]:  # the compute that read this slot is done
                self._stream.wait_event(self._consumed[slot])
            # With a timeout, an NCCL wait blocks this thread until the data is here: a message is
            # handed over only once it has arrived, and a dead sender surfaces as an error.
            dist.irecv(view, self.peer, group=self.group, tag=self.tags[1]).wait(self.timeout)
            if with_image:
                image = self._receive_image(n, self.wire)
                image.record_stream(self._compute_stream)
            ready = self._arrived[slot]
            ready.record(self._stream)
            return view, ready, image

    def recv(self, waiter: Waiter) -> Message:
        item = waiter.wait(lambda t: _queue_get(self._ready, t), f"a message from rank {self.peer}")
        if isinstance(item, BaseException):
            raise item
        msg, slot, ready = item
        if ready is not None:
            self._compute_stream.wait_event(ready)
        self._in_use.append(slot)
        # the buffer's occupancy: messages arrived and not yet consumed, this one included
        self.gate.observe(len(self._in_use) + self._ready.qsize())
        return msg

    def release(self, msg: Message) -> None:
        """The message is consumed: post the slot's receive again, the sender's room for one more
        message. Not after the STOP: the sender fills the ``capacity`` - 1 receives posted after
        it (:meth:`DistOutbox.close`) and nothing else follows."""
        slot = self._in_use.popleft()
        if self.on_gpu and not self.staged:
            self._consumed[slot].record(self._compute_stream)
            self._used[slot] = True
        if msg.kind is not Kind.STOP:
            self._post(slot)

    def close(self, waiter: Waiter) -> None:
        """Wait for the receive thread: it ends once the STOP and the fillers have arrived."""
        self._closing.set()
        if self._thread is not None:
            waiter.wait(
                lambda t: True if not self._thread.is_alive() else self._thread.join(t),
                f"the receive thread to finish (the last messages from rank {self.peer})",
            )


# ---------------------------------------------------------------------------------------------
# The backward link of the delayed-gradient regimes


class BackwardLinks:
    """The second kind of link (``train.regime`` ddg and fr): ∂loss/∂input of rank k+1's module
    back to rank k, bounded and credited like the forward link, on its own tags, each gradient
    tagged with the step of the batch it belongs to (``Message.step``)."""

    def __init__(self, outbox: DistOutbox | None, inbox: DistInbox | None) -> None:
        self.outbox = outbox  # to the rank before (None on the first rank)
        self.inbox = inbox  # from the rank after (None on the last rank)
        self._clock: Any = None

    @classmethod
    def connect(
        cls,
        rank: int,
        previous: int | None,
        following: int | None,
        link: LinkSettings,
        input_sample: tuple[tuple[int, ...], torch.dtype],
    ) -> BackwardLinks:
        """Open both ends after the forward handshakes (rank k answers rank k+1's only once its own
        towards rank k-1 is done, so no two ranks wait on each other)."""
        outbox = inbox = None
        if previous is not None:
            outbox = DistOutbox(rank, previous, link, tags=BACKWARD_TAGS)
            outbox.handshake(*input_sample)
        if following is not None:
            inbox = DistInbox(rank, following, link, tags=BACKWARD_TAGS)
            inbox.handshake()
        return cls(outbox, inbox)

    def serve(self, carries: list[Any], waiter: Waiter, clock: Any) -> None:
        """Let this rank's modules (:class:`trgl_pipe.training.delayed.DelayedModule`, in order) receive and
        send gradients: the last from the rank after, the first to the rank before, and each to
        the one before it in this process directly (it runs first in the next step)."""
        self._clock = clock
        if self.inbox is not None:
            carries[-1].recv_grad = lambda: self.recv(waiter)
        if self.outbox is not None:
            outbox = self.outbox
            carries[0].send_grad = lambda msg: clock.add_wait("send_wait", outbox.send(msg, waiter))
        for before, after in itertools.pairwise(carries):
            after.send_grad = lambda msg, to=before: to.grads.append((msg.step, msg.x, msg.step + to.delay))

    @property
    def sent_bytes(self) -> int | None:
        """Gradient bytes sent to the rank before (headers and credits not counted); None on the
        first rank, which sends none."""
        return None if self.outbox is None else self.outbox.sent_bytes

    def recv(self, waiter: Waiter) -> Message:
        assert self.inbox is not None
        t0 = time.perf_counter()
        msg = self.inbox.recv(waiter)
        if self._clock is not None:
            self._clock.add_wait("recv_wait", time.perf_counter() - t0)
        if msg.x is not None:
            msg.x = msg.x.clone()  # the slot is reused once released
        self.inbox.release(msg)
        return msg

    def close(self, waiter: Waiter) -> None:
        """After the forward STOP: tell the rank before that no gradient follows, drop the gradients
        this rank will never apply (the last batches'), then close both ends."""
        if self.outbox is not None:
            self.outbox.send(Message(Kind.STOP), waiter)
        if self.inbox is not None:
            while self.recv(waiter).kind is not Kind.STOP:
                pass
            self.inbox.close(waiter)
        if self.outbox is not None:
            self.outbox.close(waiter)
