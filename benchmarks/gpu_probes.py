"""Checks of the GPU paths one GPU can make, each in a fresh process (``gpu_check.py`` runs them).

    python benchmarks/gpu_probes.py nccl    # one rank: cpu:gloo,cuda:nccl, the ("pp","dp") mesh,
                                            # a CUDA all-reduce, an NCCL send-to-self, the stall test
    python benchmarks/gpu_probes.py syncs   # host syncs per training step (set_sync_debug_mode)

Each prints one JSON line (its figures, with ``ok``) as its last line of output.

The stall test: a send whose transfer cannot finish before a ~200 ms GPU sleep does is waited
for in a helper thread, first in a plain thread (whose current stream is the training stream, as
every thread's is), then in the transport's completer. Meanwhile the main thread queues a tiny
kernel on the training stream; the GPU time from just before that kernel to just after it says
whether the helper's wait made the training stream wait for the transfer.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sleep_cycles(ms: float) -> int:
    """GPU clock cycles that ``torch.cuda._sleep`` needs for about ``ms`` milliseconds."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return int(cycles * ms / max(start.elapsed_time(end), 1e-3))


def _send_to_self(t: torch.Tensor, out: torch.Tensor) -> list[Any]:
    ops = [dist.P2POp(dist.isend, t, 0), dist.P2POp(dist.irecv, out, 0)]
    return dist.batch_isend_irecv(ops)


def _stall_ms(cycles: int, waiter: str) -> float:
    """GPU milliseconds from the moment the helper starts waiting (the training stream idle) until
    a tiny kernel queued 50 ms later on the training stream has run: about 50 ms when the helper's
    wait leaves the training stream alone, about the sleep when it makes it wait for the send."""
    from trgl_pipe.runtime.buffer import LocalControl, Waiter
    from trgl_pipe.runtime.transport import _Completer

    device = torch.device("cuda", 0)
    side = torch.cuda.Stream(device)
    t = torch.ones(1024, device=device)
    out = torch.empty_like(t)
    u = torch.zeros(1024, device=device)
    torch.cuda.synchronize()
    before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    before.record()  # the training stream is idle: this marks the host's "now" on it
    with torch.cuda.stream(side):
        torch.cuda._sleep(cycles)  # the transfer cannot end before this does
        works = _send_to_self(t, out)
    entered = threading.Event()
    if waiter == "plain thread":

        def wait() -> None:
            torch.cuda.set_device(device)
            entered.set()
            for work in works:
                work.wait(timedelta(seconds=30))

        thread = threading.Thread(target=wait)
        thread.start()
    else:
        completer = _Completer("sends-to-0", device, 30)
        completer.add(works, [t, out], None)
        entered.set()
    entered.wait(10)
    time.sleep(0.05)  # the helper has called wait(): any stream wait it causes is queued
    u.add_(1)  # the next compute of the training loop
    after.record()
    after.synchronize()
    if waiter == "plain thread":
        thread.join(30)
    else:
        completer.close(Waiter(LocalControl(), 30, "probe"), "the probe's sends")
    torch.cuda.synchronize()
    return before.elapsed_time(after)


def nccl() -> dict[str, Any]:
    from trgl_pipe.runtime.layout import Layout
    from trgl_pipe.runtime.mesh import create_mesh

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timedelta(seconds=60))
    limit = timedelta(seconds=60)
    mesh, pp, dp = create_mesh(Layout(1, 1, 1), 0, "cuda", limit, limit)
    figures: dict[str, Any] = {"mesh": str(mesh)}
    x = torch.full((4,), 2.0, device=device)
    dist.all_reduce(x, group=dp)
    figures["cuda_all_reduce"] = x.tolist() == [2.0] * 4
    header = torch.arange(8)
    dist.all_reduce(header, group=pp)  # gloo on the same groups (CPU tensors)
    figures["cpu_all_reduce"] = header.tolist() == list(range(8))
    t = torch.randn(64, 16, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    from trgl_pipe.runtime.transport import from_wire, to_wire

    wire = to_wire(t, True)
    got = torch.empty_like(wire)
    for work in _send_to_self(wire, got):
        work.wait(timedelta(seconds=30))
    torch.cuda.synchronize()
    figures["nccl_send_to_self_channels_last"] = bool(torch.equal(from_wire(got, True), t))
    cycles = _sleep_cycles(200.0)
    figures["gpu_sleep_ms"] = 200.0
    figures["stall_ms_plain_thread"] = round(_stall_ms(cycles, "plain thread"), 2)
    figures["stall_ms_completer"] = round(_stall_ms(cycles, "completer"), 2)
    # the completer must not hold the training stream for the transfer; the plain thread shows
    # whether this torch makes a waiting thread's stream wait at all (if not, the test is moot)
    figures["completer_stalls_training"] = figures["stall_ms_completer"] > 100.0
    figures["plain_thread_stalls_training"] = figures["stall_ms_plain_thread"] > 100.0
    dist.destroy_process_group()
    figures["ok"] = (
        figures["cuda_all_reduce"]
        and figures["cpu_all_reduce"]
        and figures["nccl_send_to_self_channels_last"]
        and not figures["completer_stalls_training"]
    )
    return figures


def syncs(steps: int = 30, log_every: int = 10) -> dict[str, Any]:
    """Host syncs per training step of two modules, as the loop runs them on one GPU."""
    from trgl_pipe.config import load_config
    from trgl_pipe.context import build_context
    from trgl_pipe.runtime.clock import CudaEventClock
    from trgl_pipe.runtime.messages import Kind, Message
    from trgl_pipe.training.worker import StageWorker

    class Quiet:
        def log(self, *args: Any, **kwargs: Any) -> None:
            pass

    cfg = load_config(
        None,
        [
            "device=cuda",
            "data.source=embedded",
            "data.train_size=2048",
            "data.batch_size=64",
            "model.depth=14",
            "model.width=16",
            "model.num_modules=2",
            "train.channels_last=true",
        ],
    )
    device = torch.device("cuda", 0)
    ctx = build_context(cfg, device)
    clock = CudaEventClock(device)
    workers = [StageWorker(ctx.build_stage(k), Quiet(), log_every, clock=clock) for k in range(2)]
    batches = list(ctx.batches.train_batches(0))
    counts: list[tuple[int, bool]] = []
    first: list[str] = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        x, y = x.pin_memory(), y.pin_memory()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                msg = Message(Kind.TRAIN, x, y, step=step)
                for worker in workers:
                    clock.waiting_for_input()
                    msg = worker.handle(msg)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        found = [str(w.message)[:120] for w in caught if "synchroniz" in str(w.message).lower()]
        logging = (step + 1) % log_every == 0
        counts.append((len(found), logging))
        if found and step >= 2 and not logging and not first:
            first = found[:3]
    torch.cuda.synchronize()
    steady = [n for i, (n, logging) in enumerate(counts) if i >= 2 and not logging]
    figures: dict[str, Any] = {
        "steps": steps,
        "log_every_steps": log_every,
        "syncs_per_step": [n for n, _ in counts],
        "max_syncs_outside_logging_steps": max(steady) if steady else None,
    }
    if first:
        figures["first_syncs"] = first
    figures["ok"] = bool(steady) and max(steady) == 0
    return figures


def main() -> int:
    probe = sys.argv[1] if len(sys.argv) > 1 else ""
    if probe not in ("nccl", "syncs"):
        print("usage: python benchmarks/gpu_probes.py nccl|syncs", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: these probes need a CUDA GPU", file=sys.stderr)
        return 2
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29577")
    figures = nccl() if probe == "nccl" else syncs()
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
