"""Benchmark 1: pipeline efficiency, the steady-state rate over the ideal B / max_k t_k.

One repeat = three measurements taken one after the other (repeats interleave them, so drifts of
the machine fall on all three alike):
- alone: t_k, the median time of one training step of module k (forward, local loss, backward,
  optimizer step) timed in one process, one module at a time, with the threads its rank gets;
- co-run: the same step timed while all K modules run at once in separate processes with no
  communication at all (what sharing the machine costs, which no schedule can recover);
- pipeline: K ranks under torchrun. Its rate is the last module's samples/s between training step
  ``--skip`` and the last step (the steady window), and from its trace each rank's busy time in
  that same window (host time spent handling messages).
Efficiencies, each the pipeline rate over an ideal B / max_k t_k:
- ``efficiency_vs_alone``: t_k alone (includes what contention costs);
- ``efficiency_vs_corun``: t_k co-run (the pipeline's own loss: waits, transfers, scheduling);
- ``bottleneck_busy``: the slowest rank's busy fraction in the steady window (not an efficiency
  of the schedule but how close the bottleneck is to computing all the time).
The target is 0.95 for efficiency_vs_corun.

    python benchmarks/efficiency.py --k 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import run, steady_throughput, torchrun_cmd, workload, workload_parser, write_results

from trgl_pipe.config import load_config
from trgl_pipe.context import build_context


def overrides(args: argparse.Namespace, out_dir: Path, split: str | None = None) -> list[str]:
    return [
        *workload(args, out_dir, split=split),
        f"train.num_threads={args.threads}",
        f"pipeline.buffer_size={args.buffer}",
    ]


def stage_times(args: argparse.Namespace, split: str | None = None) -> tuple[list[float], list[list[int]]]:
    """Median step time of each module alone, with the threads of one rank."""
    torch.set_num_threads(args.threads)
    cfg = load_config(None, overrides(args, Path(tempfile.mkdtemp()), split))
    ctx = build_context(cfg, torch.device("cpu"))
    stages = [ctx.build_stage(k) for k in range(ctx.num_modules)]
    batches = [b for _, b in zip(range(args.timed + 3), ctx.batches.train_batches(0), strict=False)]
    times = []
    inputs = batches
    for stage in stages:
        samples, outputs = [], []
        for i, (x, y) in enumerate(inputs):
            t0 = time.perf_counter()
            out = stage.train_step(x, y)
            if i >= 3:
                samples.append(time.perf_counter() - t0)
            outputs.append((out, y))
        times.append(statistics.median(samples))
        inputs = outputs
    return times, [list(r) for r in ctx.partition]


def time_module_while_others_run(
    args: argparse.Namespace, module: int, start_at: float, seconds: float
) -> float:
    """Median step time of one module between ``start_at`` and ``start_at + seconds`` (wall clock)."""
    torch.set_num_threads(args.threads)
    cfg = load_config(None, overrides(args, Path(tempfile.mkdtemp()), args.split))
    ctx = build_context(cfg, torch.device("cpu"))
    stages = [ctx.build_stage(k) for k in range(module + 1)]
    inputs = [b for _, b in zip(range(8), ctx.batches.train_batches(0), strict=False)]
    for stage in stages[:module]:
        inputs = [(stage.forward_frozen(x), y) for x, y in inputs]
    time.sleep(max(0.0, start_at - time.time()))
    samples = []
    while time.time() < start_at + seconds:
        for x, y in inputs:
            t0 = time.perf_counter()
            stages[module].train_step(x, y)
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples[2:])


def corun_times(args: argparse.Namespace, cuts: str) -> list[float]:
    """Each module's step time while all K modules run at once in separate processes.

    No communication at all: what is left is what the machine does to processes sharing it
    (memory bandwidth, caches, clock), which the pipeline cannot avoid either.
    """
    start_at = time.time() + 20  # every process has loaded its data and built its module by then
    common = [
        "--split",
        cuts,
        "--k",
        str(args.k),
        "--depth",
        str(args.depth),
        "--width",
        str(args.width),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--start-at",
        str(start_at),
        "--seconds",
        str(args.corun_seconds),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--time-module", str(k), *common],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent,
            env=env,
        )
        for k in range(args.k)
    ]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    parser = workload_parser(__doc__.splitlines()[0], steps=120)
    parser.add_argument("--split", default="balanced")
    parser.add_argument("--buffer", type=int, default=2)
    parser.add_argument("--timed", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corun-seconds", type=float, default=20)
    parser.add_argument("--time-module", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=20, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_module is not None:
        print(time_module_while_others_run(args, args.time_module, args.start_at, args.seconds))
        return

    rows = []
    for r in range(args.repeats):
        times, partition = stage_times(args)
        cuts = "[" + ",".join(str(a) for a, _ in partition[1:]) + "]"  # the same split in the pipeline
        together = corun_times(args, cuts)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            cmd = torchrun_cmd(args.k, [*overrides(args, out, cuts), "debug.trace=true"])
            run(cmd, env={"OMP_NUM_THREADS": str(args.threads)})
            rate = steady_throughput(out, args.batch, args.skip)
            busy = steady_busy(out, args.k, args.skip)
        row = {
            "repeat": r,
            "partition": str(partition),
            **{f"alone_t{k}_ms": round(1000 * t, 1) for k, t in enumerate(times)},
            **{f"corun_t{k}_ms": round(1000 * t, 1) for k, t in enumerate(together)},
            "pipeline_samples_per_s": round(rate, 1),
            "efficiency_vs_alone": round(rate / (args.batch / max(times)), 3),
            "efficiency_vs_corun": round(rate / (args.batch / max(together)), 3),
            "bottleneck_busy": round(max(busy), 3),
            **{f"rank{k}_busy": round(b, 3) for k, b in enumerate(busy)},
        }
        print(row, flush=True)
        rows.append(row)

    def spread(key: str) -> str:
        values = [row[key] for row in rows]
        return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"

    notes = [
        f"K={args.k} ranks under torchrun (gloo, CPU), {args.threads} intra-op thread(s) per rank; "
        f"ResNet-{args.depth} width {args.width}, batch {args.batch}, split {args.split}, "
        f"buffer_size {args.buffer}, TRGL {'on' if args.trgl else 'off'}; embedded Fashion-MNIST; "
        f"{args.repeats} repeats, each alone -> co-run -> pipeline, interleaved.",
        f"pipeline_samples_per_s: the last module's rate from step {args.skip} to step {args.steps}; "
        "rank_k_busy: the host time rank k spent handling messages between its step "
        f"{args.skip} and its last step, over that window's length.",
        "alone_t_k: module k's step timed alone; corun_t_k: timed while all modules run at once in "
        "separate processes without communication.",
        f"efficiency_vs_alone: {spread('efficiency_vs_alone')}",
        f"efficiency_vs_corun (target 0.95): {spread('efficiency_vs_corun')}",
        f"bottleneck_busy: {spread('bottleneck_busy')}",
    ]
    write_results(f"efficiency_k{args.k}", f"Pipeline efficiency, K={args.k}", rows, notes)


def steady_busy(out: Path, k: int, skip: int) -> list[float]:
    """Each rank's busy fraction between its training step ``skip`` and its last training step."""
    fractions = []
    for rank in range(k):
        events = [json.loads(line) for line in (out / f"trace.rank{rank}.jsonl").read_text().splitlines()]
        train = [e for e in events if e["event"] == "consumed" and e["kind"] == "TRAIN"]
        window = train[skip:]
        start = window[0]["t"] - window[0]["seconds"]  # the window opens when its first step starts
        end = window[-1]["t"]
        busy = sum(
            e["seconds"]
            for e in events
            if e["event"] == "consumed" and start <= e["t"] - e["seconds"] and e["t"] <= end
        )
        fractions.append(busy / (end - start))
    return fractions


if __name__ == "__main__":
    main()
