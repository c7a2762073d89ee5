"""The runtime's own cost per message, against the raw link it runs on.

A module that does nothing: each rank receives a batch and passes it on unchanged, so the rate is
set by the transport alone. Two links, each against its physical limit:

- ``dist``: K ranks under torchrun (gloo, one process per rank, CPU tensors). The runtime
  (``DistInbox``/``DistOutbox``: header and activation, receives posted ahead, a receive thread
  and a send-completion thread per link) against raw ``torch.distributed`` isend/irecv of the
  same tensors between the same processes (one blocking forward per hop, no header). Three more
  variants, for what the format and the threads cost: ``apart``, the runtime with header and
  activation as separate messages (``PACK_LIMIT = 0``: the format above 64 KiB); ``packed``,
  every size as one message; ``rendezvous``, a floor, not the runtime: one packed message per hop
  waited for by the main thread, receives posted ahead into ``buffer`` slots (a gloo send
  completes only once its receive is posted), no threads. All measured in the same processes,
  interleaved, size by size.
- ``sim``: K threads of one process. The in-process link (``local_link``: a bounded buffer, waits
  that time out) against a plain bounded ``queue.Queue`` chain.

For each activation size (4 KiB … 16 MiB) and K, each repeat times N messages through the chain
(messages/s at the last rank) for every variant back to back, in an order that rotates;
reported: each variant's median ratio to raw and its spread over the repeats, and its
microseconds per message.

    python benchmarks/overhead.py                 # K=2 and 4, 4 KiB..16 MiB, buffers 2 and 8, 5 repeats
    python benchmarks/overhead.py --quick         # K=2, two sizes, 2 repeats (a smoke test)
    python benchmarks/overhead.py --links sim     # the in-process link alone (results/overhead_sim.md)
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from common import run, write_results

KIB = 1024
SIZES = [4 * KIB, 64 * KIB, 1024 * KIB, 4096 * KIB, 16384 * KIB]
BATCH = 64  # samples per message; the activation is BATCH × (size / BATCH / 4) float32 values


def messages_for(size: int) -> int:
    """Enough messages for about 256 MiB per measurement, between 40 and 2000."""
    return max(40, min(2000, (256 * 1024 * KIB) // size))


def _activation(size: int) -> torch.Tensor:
    return torch.randn(BATCH, max(1, size // BATCH // 4))


# ---------------------------------------------------------------------------------------------
# dist: one process per rank


def _raw_chain(rank: int, world: int, x: torch.Tensor, n: int) -> float:
    """Seconds for ``n`` messages through the chain with plain isend/irecv (last rank's clock)."""
    import torch.distributed as dist

    buf = torch.empty_like(x)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        if rank == 0:
            dist.isend(x, 1).wait()
        else:
            dist.irecv(buf, rank - 1).wait()
            if rank < world - 1:
                dist.isend(buf, rank + 1).wait()
    elapsed = time.perf_counter() - t0
    dist.barrier()
    return elapsed


def _runtime_chain(rank: int, world: int, x: torch.Tensor, n: int, capacity: int) -> float:
    """Seconds for ``n`` messages through DistInbox/DistOutbox (the runtime's link)."""
    import torch.distributed as dist

    from trgl_pipe.runtime.buffer import LocalControl, Waiter
    from trgl_pipe.runtime.messages import Kind, Message
    from trgl_pipe.runtime.transport import DistInbox, DistOutbox, LinkSettings

    cpu = torch.device("cpu")
    waiter = Waiter(LocalControl(), 120, f"rank {rank}")
    group = dist.group.WORLD
    inbox = outbox = None
    if rank > 0:
        inbox = DistInbox(rank, rank - 1, LinkSettings(group, capacity, BATCH, cpu, 120))
    if rank < world - 1:
        outbox = DistOutbox(rank, rank + 1, LinkSettings(group, capacity, BATCH, cpu, 120))
    if inbox is not None:
        inbox.handshake()
    if outbox is not None:
        outbox.handshake(tuple(x.shape[1:]), x.dtype)
    y = torch.zeros(BATCH, dtype=torch.int64)
    dist.barrier()
    t0 = time.perf_counter()
    elapsed = 0.0
    for i in range(n + 1):  # n batches, then STOP (not timed at the last rank)
        if inbox is None:
            msg = Message(Kind.TRAIN, x, y, step=i) if i < n else Message(Kind.STOP)
        else:
            msg = inbox.recv(waiter)
            inbox.release(msg)
        if i == n - 1:
            elapsed = time.perf_counter() - t0
        if outbox is not None:
            outbox.send(msg, waiter)
    if outbox is not None:
        outbox.close(waiter)
    if inbox is not None:
        inbox.close(waiter)
    dist.barrier()
    return elapsed


def _with_pack_limit(limit: int, rank: int, world: int, x: torch.Tensor, n: int, capacity: int) -> float:
    from trgl_pipe.runtime import transport

    kept, transport.PACK_LIMIT = transport.PACK_LIMIT, limit
    try:
        return _runtime_chain(rank, world, x, n, capacity)
    finally:
        transport.PACK_LIMIT = kept


def _apart_chain(rank: int, world: int, x: torch.Tensor, n: int, capacity: int) -> float:
    """The runtime with header and activation sent as two messages, whatever their size."""
    return _with_pack_limit(0, rank, world, x, n, capacity)


def _packed_chain(rank: int, world: int, x: torch.Tensor, n: int, capacity: int) -> float:
    """The runtime with header and activation sent as one message, whatever their size."""
    return _with_pack_limit(1 << 40, rank, world, x, n, capacity)


def _rendezvous_chain(rank: int, world: int, x: torch.Tensor, n: int, capacity: int) -> float:
    """A floor for a credit-free protocol: one packed message (a 16-value header, then the
    activation) per hop, sent from the main thread; a rank keeps a receive posted in each of its
    ``capacity`` slots, and a sender waits for its previous send before the next one, so at most
    ``capacity`` + 1 messages are ahead of a receiver without any credit message."""
    from collections import deque

    import torch.distributed as dist

    head = torch.zeros(16, dtype=torch.int64)
    header_bytes = head.numel() * 8
    size = header_bytes + x.numel() * x.element_size()
    slots = [torch.empty(size, dtype=torch.uint8) for _ in range(capacity)] if rank > 0 else []
    posted = deque((dist.irecv(s, rank - 1), i) for i, s in enumerate(slots))
    outgoing = [torch.empty(size, dtype=torch.uint8) for _ in range(2)]
    pending = None
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(n):
        out = outgoing[i % 2]
        if rank == 0:
            head[0] = i
            out[:header_bytes] = head.view(torch.uint8)
            out[header_bytes:] = x.reshape(-1).view(torch.uint8)
        else:
            work, s = posted.popleft()
            work.wait()
            if rank < world - 1:
                out.copy_(slots[s])
            posted.append((dist.irecv(slots[s], rank - 1), s))  # consumed: the slot is free again
        if rank < world - 1:
            if pending is not None:
                pending.wait()
            pending = dist.isend(out, rank + 1)
    elapsed = time.perf_counter() - t0
    if pending is not None:
        pending.wait()
    if rank < world - 1:  # fill the receives the next rank still has posted
        for _ in range(capacity):
            dist.isend(outgoing[0], rank + 1).wait()
    for work, _ in posted:
        work.wait()
    dist.barrier()
    return elapsed


DIST_VARIANTS = {
    "runtime": _runtime_chain,
    "apart": _apart_chain,
    "packed": _packed_chain,
    "rendezvous": _rendezvous_chain,
}


def worker(args: argparse.Namespace) -> None:
    """One rank (under torchrun): every size, every repeat, raw and runtime interleaved."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    results: list[dict[str, Any]] = []
    for size in args.sizes:
        x = _activation(size)
        n = messages_for(size)
        _raw_chain(rank, world, x, min(n, 10))  # connections and buffers warmed up
        for repeat in range(args.repeats):
            for buffer in args.buffers:
                variants = ["raw", *args.variants]
                shift = repeat % len(variants)
                seconds = {}
                for variant in variants[shift:] + variants[:shift]:
                    if variant == "raw":
                        seconds[variant] = _raw_chain(rank, world, x, n)
                    else:
                        seconds[variant] = DIST_VARIANTS[variant](rank, world, x, n, buffer)
                results.append({"size": size, "buffer": buffer, "repeat": repeat, "n": n, **seconds})
    if rank == world - 1:
        Path(args.out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def dist_rows(k: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={k}",
            __file__,
            "--worker",
            "--out",
            str(out),
            "--repeats",
            str(args.repeats),
            "--sizes",
            *map(str, args.sizes),
            "--buffers",
            *map(str, args.buffers),
            "--variants",
            *args.variants,
        ]
        run(cmd, env={"OMP_NUM_THREADS": "1"})
        return [{"link": "dist (gloo)", "k": k, **r} for r in json.loads(out.read_text())]


# ---------------------------------------------------------------------------------------------
# sim: threads of one process


def _threads(k: int, stage: Any) -> float:
    threads = [threading.Thread(target=stage, args=(i,)) for i in range(k)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def _sim_raw(k: int, x: torch.Tensor, n: int, capacity: int) -> float:
    links = [queue.Queue(maxsize=capacity) for _ in range(k - 1)]

    def stage(i: int) -> None:
        for _ in range(n):
            item = x if i == 0 else links[i - 1].get()
            if i < k - 1:
                links[i].put(item)

    return _threads(k, stage)


def _sim_runtime(k: int, x: torch.Tensor, n: int, capacity: int) -> float:
    from trgl_pipe.runtime.buffer import LocalControl, Waiter
    from trgl_pipe.runtime.messages import Kind, Message
    from trgl_pipe.runtime.transport import local_link

    links = [local_link(capacity, f"module {i}", f"module {i + 1}") for i in range(k - 1)]
    control = LocalControl()
    y = torch.zeros(BATCH, dtype=torch.int64)

    def stage(i: int) -> None:
        waiter = Waiter(control, 120, f"module {i}")
        for j in range(n):
            if i == 0:
                msg = Message(Kind.TRAIN, x, y, step=j)
            else:
                inbox = links[i - 1][1]
                msg = inbox.recv(waiter)
                inbox.release(msg)
            if i < k - 1:
                links[i][0].send(msg, waiter)

    return _threads(k, stage)


def sim_rows(k: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for size in args.sizes:
        x = _activation(size)
        n = 20000  # a message is a reference here: its size does not matter, its count does
        _sim_raw(k, x, 100, 2)
        for repeat in range(args.repeats):
            for buffer in args.buffers:
                order = ("raw", "runtime") if repeat % 2 == 0 else ("runtime", "raw")
                seconds = {}
                for variant in order:
                    seconds[variant] = (_sim_raw if variant == "raw" else _sim_runtime)(k, x, n, buffer)
                rows.append(
                    {
                        "link": "sim (threads)",
                        "k": k,
                        "size": size,
                        "buffer": buffer,
                        "repeat": repeat,
                        "n": n,
                    }
                    | seconds
                )
    return rows


# ---------------------------------------------------------------------------------------------


def summarise(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (link, K, size): rates, the ratio's median and spread, µs per message."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault((s["link"], s["k"], s["size"], s["buffer"]), []).append(s)
    rows = []
    for (link, k, size, buffer), group in groups.items():
        raw = [g["n"] / g["raw"] for g in group]
        for variant in [v for v in group[0] if v in ("runtime", *DIST_VARIANTS)]:
            rate = [g["n"] / g[variant] for g in group]
            ratios = [g["raw"] / g[variant] for g in group]  # same n: rate ratio
            over = [1e6 * (g[variant] - g["raw"]) / g["n"] for g in group]  # µs per message, per repeat
            rows.append(
                {
                    "link": link,
                    "variant": variant,
                    "K": k,
                    "size": f"{size // KIB} KiB" if size < 1024 * KIB else f"{size // (1024 * KIB)} MiB",
                    "buffer": buffer,
                    "raw msg/s": round(statistics.median(raw), 1),
                    "msg/s": round(statistics.median(rate), 1),
                    "ratio": round(statistics.median(ratios), 3),
                    "ratio min-max": f"{min(ratios):.2f}-{max(ratios):.2f}",
                    "µs/msg": round(1e6 / statistics.median(rate), 1),
                    "raw µs/msg": round(1e6 / statistics.median(raw), 1),
                    "µs/msg over raw": round(1e6 / statistics.median(rate) - 1e6 / statistics.median(raw), 1),
                    "over raw per repeat: median (min-max)": (
                        f"{statistics.median(over):.0f} ({min(over):.0f} to {max(over):.0f})"
                    ),
                    "repeats": len(group),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="activation bytes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--buffers", type=int, nargs="+", default=[2, 8], help="pipeline.buffer_size values")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(DIST_VARIANTS),
        choices=list(DIST_VARIANTS),
        help="dist variants timed against raw",
    )
    parser.add_argument("--quick", action="store_true", help="K=2, 4 KiB and 1 MiB, 2 repeats")
    parser.add_argument("--links", nargs="+", default=["dist", "sim"], choices=["dist", "sim"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.ks, args.sizes, args.repeats = [2], [4 * KIB, 1024 * KIB], 2
    samples = []
    for k in args.ks:
        if "dist" in args.links:
            samples += dist_rows(k, args)
        if "sim" in args.links:
            samples += sim_rows(k, args)
    rows = summarise(samples)
    notes = [
        f"A module that does nothing: each rank (dist) or thread (sim) passes its input on. Batches of "
        f"{BATCH} float32 samples, buffer_size {args.buffers}; dist: gloo on one host, one process per "
        f"rank; {args.repeats} repeats per size, every variant back to back in an order that rotates "
        "from repeat to repeat; ratio = variant rate / raw rate per repeat (median, min-max).",
        "raw (dist): blocking isend/irecv of the activation hop by hop, no header and no credits (the "
        "link's limit); raw (sim): a chain of queue.Queue(maxsize=buffer_size).",
        "runtime: DistInbox/DistOutbox as they are (no credits: receives posted ahead, a receive "
        "thread and a send-completion thread per link), header and activation in one message up to "
        "transport.PACK_LIMIT; apart: the same with PACK_LIMIT = 0 (header and activation as two "
        "messages); packed: the same with every size packed; rendezvous: not the runtime but a floor "
        "(one packed message per hop waited for by the main thread, receives posted ahead, no threads).",
        "µs/msg = 1e6 / the variant's median messages/s at the last rank; over raw: minus raw's; over "
        "raw per repeat: the variant's µs per message minus raw's in the same repeat, median (min-max).",
        f"host: {os.uname().nodename}, {os.cpu_count()} CPUs; nothing else ran on it.",
    ]
    name = "overhead" if "dist" in args.links else "overhead_sim"  # a sim-only run keeps the dist results
    write_results(name, "The runtime's cost per message against the raw link", rows, notes)


if __name__ == "__main__":
    main()
