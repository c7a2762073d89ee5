"""Benchmark 5: what the method costs — TRGL against VanGL, the auxiliary heads, and the
pipeline's rate as the buffer size and K vary.

    python benchmarks/method_cost.py              # all three parts
    python benchmarks/method_cost.py --parts trgl heads

trgl:   step time of every module with the transport term against without it (the same batches,
        interleaved step by step, medians); target: at most 5% more.
heads:  the share of a module's step spent in its classifier (forward and backward of F_k alone
        on the module's output, against the whole step).
buffer: steady-state samples/s of the torchrun pipeline for each buffer size and K.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import run, steady_throughput, torchrun_cmd, workload, workload_parser, write_results

from trgl_pipe.config import load_config
from trgl_pipe.context import build_context


def base(args: argparse.Namespace, k: int, out_dir: Path) -> list[str]:
    return workload(args, out_dir, k=k)


def stages_for(args: argparse.Namespace, trgl: bool):
    cfg = load_config(
        None, [*base(args, args.k, Path(tempfile.mkdtemp())), f"trgl.enabled={str(trgl).lower()}"]
    )
    ctx = build_context(cfg, torch.device("cpu"))
    return ctx, [ctx.build_stage(i) for i in range(ctx.num_modules)]


def trgl_cost(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    ctx, with_term = stages_for(args, True)
    _, without = stages_for(args, False)
    batches = [b for _, b in zip(range(args.timed + 5), ctx.batches.train_batches(0), strict=False)]
    times = {True: [[] for _ in with_term], False: [[] for _ in without]}
    for i, (x, y) in enumerate(batches):
        for trgl, stages in ((True, with_term), (False, without)):  # interleaved, same batch
            h = x
            for k, stage in enumerate(stages):
                t0 = time.perf_counter()
                h = stage.train_step(h, y)
                if i >= 5:
                    times[trgl][k].append(time.perf_counter() - t0)
    rows = []
    for k in range(len(with_term)):
        on, off = statistics.median(times[True][k]), statistics.median(times[False][k])
        rows.append(
            {
                "part": "trgl",
                "module": k,
                "trgl_ms": round(1000 * on, 1),
                "vangl_ms": round(1000 * off, 1),
                "ratio": round(on / off, 3),
            }
        )
    total_on = sum(statistics.median(t) for t in times[True])
    total_off = sum(statistics.median(t) for t in times[False])
    rows.append(
        {
            "part": "trgl",
            "module": "all",
            "trgl_ms": round(1000 * total_on, 1),
            "vangl_ms": round(1000 * total_off, 1),
            "ratio": round(total_on / total_off, 3),
        }
    )
    return rows


def head_cost(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    ctx, stages = stages_for(args, True)
    batches = [b for _, b in zip(range(args.timed + 5), ctx.batches.train_batches(0), strict=False)]
    rows = []
    inputs = batches
    for k, stage in enumerate(stages):
        step_t, head_t, outputs = [], [], []
        for i, (x, y) in enumerate(inputs):
            t0 = time.perf_counter()
            out = stage.train_step(x, y)
            t1 = time.perf_counter()
            feat = out.detach().requires_grad_(True)
            loss = F.cross_entropy(stage.head(feat), y)
            loss.backward()
            t2 = time.perf_counter()
            if i >= 5:
                step_t.append(t1 - t0)
                head_t.append(t2 - t1)
            outputs.append((out, y))
        inputs = outputs
        step, head = statistics.median(step_t), statistics.median(head_t)
        params = sum(p.numel() for p in stage.head.parameters())
        rows.append(
            {
                "part": "heads",
                "module": k,
                "step_ms": round(1000 * step, 1),
                "head_ms": round(1000 * head, 1),
                "head_share": round(head / step, 3),
                "head_params": params,
                "kind": "network head" if k == len(stages) - 1 else "auxiliary",
            }
        )
    return rows


def buffer_sweep(args: argparse.Namespace) -> list[dict]:
    rows = []
    for k in args.ks:
        for size in args.buffer_sizes:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "run"
                run(
                    torchrun_cmd(
                        k, [*base(args, k, out), f"pipeline.buffer_size={size}", "train.num_threads=1"]
                    ),
                    env={"OMP_NUM_THREADS": "1"},
                )
                rate = steady_throughput(out, args.batch, args.skip)
            row = {"part": "buffer", "K": k, "buffer_size": size, "samples_per_s": round(rate, 1)}
            print(row, flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = workload_parser(__doc__.splitlines()[0], k=4, steps=80)
    parser.add_argument("--parts", nargs="+", default=["trgl", "heads", "buffer"])
    parser.add_argument("--timed", type=int, default=30)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--buffer-sizes", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    rows: list[dict] = []
    if "trgl" in args.parts:
        rows += trgl_cost(args)
    if "heads" in args.parts:
        rows += head_cost(args)
    if "buffer" in args.parts:
        rows += buffer_sweep(args)
    notes = [
        f"ResNet-{args.depth} width {args.width}, batch {args.batch}, embedded Fashion-MNIST, CPU, "
        f"{args.threads} thread(s) for the step timings; trgl and heads parts: K={args.k} in one process.",
        "trgl: the same batches through a TRGL and a VanGL copy of every module, interleaved step by step.",
        "heads: head_ms is a separate forward and backward of F_k on the module's output; "
        "head_share = head_ms / "
        "step_ms (the step includes the head).",
        f"buffer: torchrun pipeline, one thread per rank on {__import__('os').cpu_count()} cores (K > cores "
        f"oversubscribes them), {args.steps} steps, rates after {args.skip}.",
    ]
    columns = list(dict.fromkeys(c for r in rows for c in r))  # in order of first appearance
    write_results(
        "method_cost",
        "Costs of the method: TRGL, auxiliary heads, buffer size and K",
        rows,
        notes,
        columns=columns,
    )


if __name__ == "__main__":
    main()
