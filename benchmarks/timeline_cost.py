"""What collecting the timeline's spans costs (``log.timeline``, on by default).

Two measurements, interleaved on/off so load drifts hit both alike:
  1. one span: the time of ``SpanRecorder.until`` writing to its file, minus the same call on a
     recorder without a file (what ``log.timeline=false`` leaves), over many calls per round;
  2. a pipeline: torchrun with K ranks, ``log.timeline=true`` then ``false``, steady-state
     samples/s of each (the last module after ``--skip`` steps), and the ratio per round.
The cost per step is 3 spans (input, compute, room) x the cost of one span, divided by the
median step cycle the spans themselves show; that bound is the figure the 2% budget is checked
against, since run-to-run noise on a loaded machine is larger than 2%.

    python benchmarks/timeline_cost.py --k 2 --rounds 3
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from pathlib import Path

from common import run, steady_throughput, torchrun_cmd, workload, workload_parser, write_results

from trgl_pipe.watch.spans import SpanRecorder, read_spans


def span_cost_us(calls: int, folder: Path) -> tuple[float, float]:
    """(microseconds per span with a file, without one), one round each."""
    times = []
    for path in (folder / "bench.tsv", None):
        recorder = SpanRecorder(path, {"rank": 0})
        recorder.start()
        t0 = time.perf_counter()
        for _ in range(calls):
            recorder.until("compute")
        times.append((time.perf_counter() - t0) / calls * 1e6)
        recorder.close()
    return times[0], times[1]


def step_cycle_s(out: Path) -> float:
    """The median time from one compute span's start to the next, over every rank."""
    cycles = []
    for path in sorted((out / "spans").glob("rank*.tsv")):
        starts = [s for _, spans in read_spans(path) for c, s, _ in spans if c == "compute"]
        cycles.extend(b - a for a, b in itertools.pairwise(starts))
    return statistics.median(cycles)


def main() -> None:
    parser = workload_parser(__doc__.splitlines()[0], k=2, steps=60, skip=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    rows, span_rows, ratios, costs, cycles = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            on_us, off_us = span_cost_us(args.calls, Path(tmp))
            costs.append(on_us - off_us)
            span_rows.append({"round": round_, "span_us": round(on_us, 3), "no_file_us": round(off_us, 3)})
            rates = {}
            for timeline in (True, False):
                out = Path(tmp) / f"run-{round_}-{timeline}"
                cmd = torchrun_cmd(args.k, [*workload(args, out), f"log.timeline={str(timeline).lower()}"])
                run(cmd, env={"OMP_NUM_THREADS": str(args.threads)})
                rates[timeline] = steady_throughput(out, args.batch, args.skip)
                if timeline:
                    cycles.append(step_cycle_s(out))
            ratios.append(rates[True] / rates[False])
            rows.append(
                {
                    "round": round_,
                    "timeline on samples/s": round(rates[True], 1),
                    "off samples/s": round(rates[False], 1),
                    "on / off": round(ratios[-1], 3),
                    "span cost us": round(costs[-1], 3),
                    "step cycle ms": round(cycles[-1] * 1e3, 1),
                }
            )
    per_step = 3 * statistics.median(costs) * 1e-6 / statistics.median(cycles)
    notes = [
        f"one span costs {statistics.median(costs):.2f} us (median of {args.rounds} rounds of "
        f"{args.calls} calls; range {min(costs):.2f}-{max(costs):.2f}); a step records 3 spans, its cycle is "
        f"{statistics.median(cycles) * 1e3:.0f} ms (median over ranks and steps): "
        f"{per_step:.5%} of a step",
        f"pipeline on/off rate ratio: median {statistics.median(ratios):.3f}, range "
        f"{min(ratios):.3f}-{max(ratios):.3f} over {args.rounds} interleaved rounds "
        f"(K={args.k} torchrun ranks, {args.threads} thread each, ResNet-{args.depth} width {args.width}, "
        f"batch {args.batch}, "
        f"{args.steps} steps, TRGL {'on' if args.trgl else 'off'})",
        "the machine was shared with other jobs while this ran: the end-to-end ratios carry that noise; "
        "the per-span cost is the bound to read",
    ]
    write_results(
        f"timeline_cost_k{args.k}",
        "Cost of the timeline's span collection",
        rows,
        notes,
        extra={"span_rounds": span_rows, "cost_per_step_fraction": per_step},
    )


if __name__ == "__main__":
    main()
