"""The pipeline at the speed of its link: a K = 2 pipeline across two emulated nodes whose link is
capped, samples/s against the rate, beside trgl_pipe.plan's projection with its link term.

    python benchmarks/link_speed.py                 # 10 Mbit/s .. 10 Gbit/s and uncapped, fp32 and bf16 wire
    python benchmarks/link_speed.py --quick         # two rates, one repeat

Each node is a network namespace joined to the other by a veth pair (benchmarks/emulated_nodes.py),
one torchrun agent and one rank per node, gloo bound to the link; ``tc``'s token bucket filter caps
the link in both directions. The network is the quickstart's ResNet-20 on Fashion-MNIST cut into
two modules (module 0 sends 32x14x14 activations: 25 KB per sample in float32). The rate is the
last rank's steady training rate: training samples between its third and last logged step over
the time between them (evaluation is one small batch at the end). The projection measures each
module's step on this machine (one thread, as each rank has) and the data input, as
``python -m trgl_pipe.plan`` does, and adds the link: each step's activations over the capped rate
(``plan.project``). Needs root and iproute2; prints why not otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import emulated_nodes
import torch
from common import ROOT, write_results

from trgl_pipe.config import load_config
from trgl_pipe.plan import profile_modules, project, reader_rate, wire_bytes

BATCH = 64
RATES = [10e6, 30e6, 100e6, 300e6, 1e9, 10e9, None]  # bits/s; None: the veth uncapped
OVERRIDES = [
    "model.num_modules=2",
    f"data.batch_size={BATCH}",
    "data.val_size=64",
    "data.test_size=64",
    "data.eval_batch_size=64",
    "train.epochs=1",
    "train.eval_every_epochs=0",
    "train.num_threads=1",
    "log.every_steps=1",
    "log.live=off",
    "checkpoint.every_epochs=0",
]
WARM = 2  # steps left out of the rate: connections, first allocations


def _label(rate: float | None) -> str:
    if rate is None:
        return "uncapped"
    return f"{rate / 1e9:g} Gbit/s" if rate >= 1e9 else f"{rate / 1e6:g} Mbit/s"


def measure(nodes: list[emulated_nodes.Node], overrides: list[str], steps: int, port: int) -> float:
    """The last rank's steady training samples/s of one pipeline run across the two nodes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        target = [
            "-m",
            "trgl_pipe.run",
            "configs/quickstart.yaml",
            *overrides,
            f"train.max_steps={steps}",
            f"out_dir={out}",
        ]
        launches = emulated_nodes.torchrun_on_nodes(nodes, 1, target, port=port, run_id=f"link{port}")
        ended = emulated_nodes.run_agents(launches, ROOT, timeout=900)
        if any(code for code, _ in ended):
            raise RuntimeError("a node failed: " + " | ".join(err.strip()[-600:] for _, err in ended))
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = sorted(e["time_s"] for e in events if e["event"] == "train" and e["module"] == 1)
    assert len(times) == steps, (len(times), steps)
    return (steps - 1 - WARM) * BATCH / (times[-1] - times[WARM])


def projection(overrides: list[str], rate: float | None) -> dict[str, Any]:
    """trgl_pipe.plan's projection for one rank per module on this machine, the link at ``rate``."""
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    torch.set_num_threads(1)
    profiles = profile_modules(cfg, [BATCH], torch.device("cpu"), repeats=5)
    reader = reader_rate(cfg)
    gbps = 1e3 if rate is None else rate / 1e9  # uncapped: the stages decide
    layout = project(profiles, 1, 1, BATCH, gbps, reader, cfg.pipeline.buffer_size, BATCH, wire_bytes(cfg))
    return {
        "samples_per_s": layout.samples_per_s,
        "stage_s": layout.stage_time_s,
        "link_s": layout.link_s[0],
        "bottleneck": "link" if layout.link_limited else ("data" if layout.reader_limited else "stage"),
        "activation_bytes": profiles[0].output_features * BATCH * wire_bytes(cfg),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=None, help="bits/s; 0 for uncapped")
    parser.add_argument("--wire", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="training steps per run")
    parser.add_argument("--quick", action="store_true", help="10 and 100 Mbit/s, fp32, one repeat, 8 steps")
    args = parser.parse_args()
    reason = emulated_nodes.why_not()
    if reason is not None:
        print(f"link_speed: {reason}", file=sys.stderr)
        sys.exit(2)
    rates = RATES if args.rates is None else [r or None for r in args.rates]
    if args.quick:
        rates, args.wire, args.repeats, args.steps = [10e6, 100e6], ["fp32"], 1, 8
    rows = []
    port = 29600
    with emulated_nodes.two_nodes() as nodes:
        for rate in rates:
            emulated_nodes.cap(nodes, rate)
            for wire in args.wire:
                overrides = [*OVERRIDES, *(["pipeline.wire_dtype=bf16"] if wire == "bf16" else [])]
                projected = projection(overrides, rate)
                measured = []
                for _ in range(args.repeats):
                    port += 1
                    measured.append(measure(nodes, overrides, args.steps, port))
                median = statistics.median(measured)
                rows.append(
                    {
                        "link": _label(rate),
                        "wire": wire,
                        "MB per step": projected["activation_bytes"] / 1e6,
                        "measured samples/s": median,
                        "min-max": f"{min(measured):.1f}-{max(measured):.1f}",
                        "projected samples/s": projected["samples_per_s"],
                        "measured / projected": median / projected["samples_per_s"],
                        "projected bottleneck": projected["bottleneck"],
                        "link s per step": projected["link_s"],
                        "stage s per step": "/".join(f"{t:.3f}" for t in projected["stage_s"]),
                        "repeats": args.repeats,
                    }
                )
                print(rows[-1], flush=True)
    notes = [
        "K = 2 pipeline (configs/quickstart.yaml, ResNet-20 on Fashion-MNIST, model.num_modules=2, "
        f"batch {BATCH}), one rank per emulated node (network namespaces joined by a veth pair, gloo bound "
        "to it), one thread per rank on this 2-core machine; the link capped in both directions by tc's "
        "token bucket filter (bucket 10 ms of the rate, at least 64 KiB; queue 100 ms).",
        f"measured: the last rank's training samples between its step {WARM + 1} and its last step over "
        f"the time between them, median over the repeats (min-max beside); {args.steps} steps per run.",
        "projected: trgl_pipe.plan's model: each module's step measured here (one thread), the data "
        "input's rate, and the link term: one step's activations (MB per step) over the capped rate, "
        "overlapped with computing; rate = batch / the slowest of stages and link.",
        "bf16: pipeline.wire_dtype=bf16 (2 bytes per value on the wire).",
    ]
    write_results("link_speed", "The pipeline at the speed of its link", rows, notes)


if __name__ == "__main__":
    main()
