"""Benchmark 2: the pipeline against single-process training on the same cores.

Same model, batch and data, interleaved A B C A B C ...:
  A  pipeline: torchrun with K ranks, one intra-op thread per rank (``--threads``)
  B  the single-process parallel regime using every core as intra-op threads
  C  end-to-end training in one process using every core
  D  the single-process parallel regime with one thread (what one device does alone)
Each rate is steady-state samples/s (the last module after ``--skip`` steps); the table gives the
medians and the ratios A/B and A/C.

    python benchmarks/speedup.py --k 2      # the issue's target: A/B >= 1.5 on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from common import run, steady_throughput, torchrun_cmd, trgl_cmd, workload, workload_parser, write_results


def base(args: argparse.Namespace, out_dir: Path) -> list[str]:
    return workload(args, out_dir)


def measure(args: argparse.Namespace, variant: str) -> float:
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        if variant == "pipeline":
            cmd = torchrun_cmd(args.k, [*base(args, out), f"train.num_threads={args.threads}"])
            run(cmd, env={"OMP_NUM_THREADS": str(args.threads)})
        elif variant == "parallel":
            run(trgl_cmd([*base(args, out), f"train.num_threads={cores}"]))
        elif variant == "parallel-1":
            run(
                trgl_cmd([*base(args, out), f"train.num_threads={args.threads}"]),
                env={"OMP_NUM_THREADS": str(args.threads)},
            )
        else:
            run(trgl_cmd([*base(args, out), f"train.num_threads={cores}", "train.regime=e2e"]))
        return steady_throughput(out, args.batch, args.skip)


def main() -> None:
    parser = workload_parser(__doc__.splitlines()[0], steps=100)
    parser.add_argument("--split", default="[3]")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    variants = ("pipeline", "parallel", "e2e", "parallel-1")
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants:
            rates[v].append(measure(args, v))
            print(f"repeat {r} {v}: {rates[v][-1]:.1f} samples/s", flush=True)
    med = {v: statistics.median(rates[v]) for v in variants}
    rows = [
        {
            "variant": f"pipeline, {args.k} ranks x {args.threads} thread(s)",
            "samples_per_s": round(med["pipeline"], 1),
            "runs": ", ".join(f"{x:.0f}" for x in rates["pipeline"]),
            "speedup": 1.0,
        },
        {
            "variant": f"parallel regime, 1 process x {os.cpu_count()} threads",
            "samples_per_s": round(med["parallel"], 1),
            "runs": ", ".join(f"{x:.0f}" for x in rates["parallel"]),
            "speedup": round(med["pipeline"] / med["parallel"], 3),
        },
        {
            "variant": f"end-to-end, 1 process x {os.cpu_count()} threads",
            "samples_per_s": round(med["e2e"], 1),
            "runs": ", ".join(f"{x:.0f}" for x in rates["e2e"]),
            "speedup": round(med["pipeline"] / med["e2e"], 3),
        },
        {
            "variant": f"parallel regime, 1 process x {args.threads} thread(s)",
            "samples_per_s": round(med["parallel-1"], 1),
            "runs": ", ".join(f"{x:.0f}" for x in rates["parallel-1"]),
            "speedup": round(med["pipeline"] / med["parallel-1"], 3),
        },
    ]
    scaling = med["parallel"] / med["parallel-1"]
    notes = [
        f"ResNet-{args.depth} width {args.width}, batch {args.batch}, K={args.k} (split {args.split}), "
        f"TRGL {'on' if args.trgl else 'off'}, embedded Fashion-MNIST; {args.steps} steps, rates from step "
        f"{args.skip}; {args.repeats} interleaved repeats, medians.",
        "speedup: the pipeline's median rate over this variant's median rate.",
        f"intra-op scaling of the single process from {args.threads} to {os.cpu_count()} threads: "
        f"{scaling:.2f}x; "
        f"so a {args.k}-rank pipeline with {args.threads} thread(s) per rank can beat it by at most "
        f"{args.k / scaling:.2f}x "
        "(perfect balance, no communication cost).",
    ]
    write_results(f"speedup_k{args.k}", f"Pipeline speedup over one process, K={args.k}", rows, notes)


if __name__ == "__main__":
    main()
