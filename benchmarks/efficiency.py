"""Benchmark 1: pipeline efficiency, steady-state samples/s over the ideal B / max_k t_k.

t_k is the time of one training step of module k alone (forward, local loss, backward, optimizer
step) with the threads its rank gets, measured in this process before the pipeline runs. The
pipeline then runs under torchrun with K ranks; its steady-state rate is the last module's rate
after the first ``--skip`` steps. Efficiency = rate / (B / max_k t_k).

    python benchmarks/efficiency.py --k 2            # the issue's target: >= 0.90 at K=2 on 2 cores
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
        ideal = args.batch / max(times)
        together = corun_times(args, cuts)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            run(torchrun_cmd(args.k, overrides(args, out, cuts)), env={"OMP_NUM_THREADS": str(args.threads)})
            rate = steady_throughput(out, args.batch, args.skip)
            ranks = json.loads((out / "summary.json").read_text())["ranks"]
        # where each rank's time went inside the pipeline: host time in training steps, per step
        inside = [x["train_compute_s"] / args.steps for x in ranks]
        row = {
            "repeat": r,
            "partition": str(partition),
            **{f"t{k}_ms": round(1000 * t, 1) for k, t in enumerate(times)},
            **{f"corun_t{k}_ms": round(1000 * t, 1) for k, t in enumerate(together)},
            **{f"in_pipeline_t{k}_ms": round(1000 * t, 1) for k, t in enumerate(inside)},
            **{f"rank{k}_wait_s": round(x["recv_wait_s"] + x["send_wait_s"], 2) for k, x in enumerate(ranks)},
            "ideal_samples_per_s": round(ideal, 1),
            "pipeline_samples_per_s": round(rate, 1),
            "efficiency": round(rate / ideal, 3),
            "efficiency_vs_corun": round(rate / (args.batch / max(together)), 3),
            "efficiency_vs_in_pipeline_steps": round(rate / (args.batch / max(inside)), 3),
        }
        print(row, flush=True)
        rows.append(row)
    eff = statistics.median(r["efficiency"] for r in rows)
    notes = [
        f"K={args.k} ranks under torchrun (gloo, CPU), {args.threads} intra-op thread(s) per rank; "
        f"ResNet-{args.depth} width {args.width}, batch {args.batch}, split {args.split}, "
        f"buffer_size {args.buffer}, "
        f"TRGL {'on' if args.trgl else 'off'}; embedded Fashion-MNIST.",
        "t_k: median time of a training step of module k alone, in this process, before each pipeline run.",
        f"pipeline_samples_per_s: the last module's rate from step {args.skip} to step {args.steps}.",
        "corun_t_k: the same step timed while all K modules run at once in separate processes, without "
        "any communication; efficiency_vs_corun uses those times for the ideal.",
        "in_pipeline_t_k: the same step timed inside the pipeline run (train_compute_s / steps of rank k); "
        "efficiency_vs_in_pipeline_steps: the rate over B / max_k of those, i.e. how close the slowest rank "
        "is to computing all the time; rank_k_wait_s: its receive plus send waits over the whole run.",
        f"median efficiency over {args.repeats} repeats: {eff:.3f}",
    ]
    write_results(f"efficiency_k{args.k}", f"Pipeline efficiency, K={args.k}", rows, notes)


if __name__ == "__main__":
    main()
