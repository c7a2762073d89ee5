"""Benchmark 4: trgl_pipe's pipeline against torch.distributed.pipelining on the same stages.

The same ResNet cut into the same K stages, batch and data shape, on the same device.
torch.distributed.pipelining trains it end to end (backpropagation crosses the stages) with
ScheduleGPipe and Schedule1F1B at several micro-batch counts; trgl_pipe trains it module-wise
(each stage its own loss and auxiliary head, no gradient crosses a stage). So the two do not
compute the same thing: this is the cost of training the same network both ways.

Both sides are timed the same way: the last rank's timestamps of its training steps (after a CUDA
synchronisation on a GPU: trgl_pipe's trace synchronises the device before each stamp), and the
rate over the steady window from step ``--skip`` to the last,
batch × steps / seconds. Inputs are made inside the loop on both sides (trgl_pipe's first rank
reads and normalises its batches; the pipelining side draws random ones). Variants run in
interleaved repeats; reported: the median rate, its spread, and each rank's peak memory (process
peak RSS on CPU, torch.cuda.max_memory_allocated on a GPU).

    python benchmarks/vs_pipelining.py --k 2 --repeats 3 [--device cuda]

``--device cuda`` needs one GPU per rank: the pipelining side runs on NCCL, which refuses two
ranks on one GPU (trgl_pipe would fall back to gloo there, and the two would not be comparable).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import run, torchrun_cmd, workload, workload_parser, write_results
from torch import nn

MIB = 2**20


class StageModule(nn.Module):
    """Blocks ``a..b-1`` (with the stem first, the head last) returning plain tensors."""

    def __init__(self, parts, a: int, b: int, first: bool, last: bool) -> None:
        super().__init__()
        self.stem = parts.stem if first else None
        self.blocks = nn.ModuleList(parts.blocks[a:b])
        self.head = parts.head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(x)
        for block in self.blocks:
            x, _ = block(x)  # (output, residuals)
        return self.head(x) if self.head is not None else x


def window_rate(times: list[float], batch: int, skip: int) -> float:
    """Samples/s between the end of step ``skip`` and the end of the last step."""
    return (len(times) - 1 - skip) * batch / (times[-1] - times[skip])


def worker(args: argparse.Namespace) -> None:
    """One rank of a torch.distributed.pipelining run (started by torchrun)."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from trgl_pipe.config import load_config
    from trgl_pipe.partition import split_at
    from trgl_pipe.stage import build_parts

    torch.set_num_threads(args.threads)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = (
        torch.device("cuda", local % torch.cuda.device_count())
        if args.device == "cuda"
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(None, [f"model.depth={args.depth}", f"model.width={args.width}"])
    parts = build_parts(cfg, (1, 28, 28), 10)
    partition = split_at(parts.num_blocks, json.loads(args.cuts))
    a, b = partition[rank]
    module = StageModule(parts, a, b, rank == 0, rank == world - 1).to(device)
    micro = args.batch // args.microbatches
    example = torch.zeros(micro, 1, 28, 28)
    with torch.no_grad():
        for i in range(rank):  # the input of this stage: the earlier stages' output shape
            x0, x1 = partition[i]
            example = StageModule(parts, x0, x1, i == 0, False)(example)
    stage = PipelineStage(module, rank, world, device, input_args=(example.to(device),))
    schedule_cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[args.schedule]
    schedule = schedule_cls(stage, n_microbatches=args.microbatches, loss_fn=nn.functional.cross_entropy)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps = []
    for _ in range(args.steps):
        x = torch.randn(args.batch, 1, 28, 28, generator=gen).to(device)
        y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            schedule.step(x)
        elif rank == world - 1:
            schedule.step(target=y)
        else:
            schedule.step()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "peak": peak, "stamps": stamps})
    if rank == 0:
        result = {
            "samples_per_s": window_rate(gathered[-1]["stamps"], args.batch, args.skip),
            "peaks": [g["peak"] for g in gathered],
        }
        Path(args.out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def trgl_variant(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        overrides = [
            *workload(args, out, split=args.cuts),
            f"train.num_threads={args.threads}",
            f"device={args.device}",
            "debug.trace=true",
        ]
        run(torchrun_cmd(args.k, overrides), env={"OMP_NUM_THREADS": str(args.threads)})
        summary = json.loads((out / "summary.json").read_text())
        trace = (out / f"trace.rank{args.k - 1}.jsonl").read_text().splitlines()
        stamps = [e["t"] for e in map(json.loads, trace) if e["event"] == "consumed" and e["kind"] == "TRAIN"]
        return {
            "samples_per_s": window_rate(stamps, args.batch, args.skip),
            "peaks": [r["peak_memory_bytes"] for r in summary["ranks"]],
        }


def pipelining_variant(args: argparse.Namespace, schedule: str, microbatches: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.k}",
            __file__,
            "--worker",
            *("--schedule", schedule, "--microbatches", str(microbatches), "--out", str(out)),
            *("--k", str(args.k), "--depth", str(args.depth), "--width", str(args.width)),
            *("--batch", str(args.batch), "--cuts", args.cuts, "--steps", str(args.steps)),
            *("--skip", str(args.skip), "--threads", str(args.threads), "--device", args.device),
        ]
        run(cmd, env={"OMP_NUM_THREADS": str(args.threads)})
        return json.loads(out.read_text())


def main() -> None:
    parser = workload_parser(__doc__.splitlines()[0], steps=60, skip=10)
    parser.add_argument("--cuts", default="[3]", help="block indices where stages 2..K start")
    parser.add_argument("--microbatch-counts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--schedule", default="gpipe", help=argparse.SUPPRESS)
    parser.add_argument("--microbatches", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.device == "cuda" and torch.cuda.device_count() < args.k:
        sys.exit(
            f"error: --device cuda needs {args.k} GPUs (one per rank: NCCL refuses two ranks on one GPU), "
            f"this machine has {torch.cuda.device_count()}; run it where there are {args.k}, "
            "or use --device cpu"
        )
    variants = [("trgl_pipe (module-wise)", None, None)]
    for m in args.microbatch_counts:
        variants.append((f"pipelining GPipe, {m} micro-batches", "gpipe", m))
        if m >= args.k:
            variants.append((f"pipelining 1F1B, {m} micro-batches", "1f1b", m))
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for repeat in range(args.repeats):  # interleaved: every variant once per round
        for name, schedule, m in variants:
            result = trgl_variant(args) if schedule is None else pipelining_variant(args, schedule, m)
            results[name].append(result)
            print(f"round {repeat}: {name}: {result['samples_per_s']:.1f} samples/s", flush=True)
    rows = []
    for name, _, _ in variants:
        rates = [r["samples_per_s"] for r in results[name]]
        peaks = [max(r["peaks"][k] for r in results[name]) for k in range(args.k)]
        rows.append(
            {
                "variant": name,
                "samples_per_s_median": round(statistics.median(rates), 1),
                "min_max": f"{min(rates):.0f}-{max(rates):.0f}",
                **{f"rank{k}_peak_MiB": round(p / MIB) for k, p in enumerate(peaks)},
            }
        )
    base = rows[0]["samples_per_s_median"]
    for row in rows:
        row["trgl_pipe_speedup"] = round(base / row["samples_per_s_median"], 3)
    notes = [
        f"K={args.k} ranks on {args.device} ({'gloo' if args.device == 'cpu' else 'nccl'}), {args.threads} "
        f"thread(s) per rank; ResNet-{args.depth} width {args.width}, batch {args.batch}, stages start at "
        f"blocks {args.cuts}; {args.steps} steps; rate over steps {args.skip}..{args.steps - 1} at the last "
        f"rank, both sides timed the same way; {args.repeats} interleaved repeats (median, min-max).",
        "torch.distributed.pipelining trains end to end (the gradient crosses the stages); trgl_pipe trains "
        "each stage on its own loss with an auxiliary head (TRGL): not the same computation, the same "
        "network trained both ways.",
        "Peaks: the largest over the repeats; process peak RSS on CPU (includes the Python and torch "
        "runtime, about the same in both), torch.cuda.max_memory_allocated on a GPU.",
        f"host: {os.uname().nodename}",
    ]
    write_results(
        f"vs_pipelining_k{args.k}", f"trgl_pipe against torch.distributed.pipelining, K={args.k}", rows, notes
    )


if __name__ == "__main__":
    main()
