"""Benchmark: what DDG and Features Replay cost against the local-loss pipeline — step time and
memory per stage, and the bytes on the wire.

    python benchmarks/delayed_cost.py --rounds 5         # committed results: K = 2 and 4, ~10 min on 2 cores
    python benchmarks/delayed_cost.py --ks 2 --rounds 1  # a quick look (about a minute)

Three regimes on the same network, split, data and batch, each a torchrun pipeline of K ranks
(gloo, CPU, one thread per rank), run in interleaved rounds (local, ddg, fr, local, ddg, fr, ...):

- local: ``train.regime=parallel`` with ``trgl.enabled=false``: VanGL, every module trained by
  its own auxiliary head (the local-loss baseline; ddg and fr refuse the TRGL term);
- ddg: ``train.regime=ddg`` (module k keeps the graphs of its K-1-k batches in flight);
- fr: ``train.regime=fr`` (module k keeps their inputs and replays its forward).

Everything is read from the run folders, nothing is added to the runtime for it:

- step time, from ``spans/rank<r>.tsv`` (``log.timeline``): per stage, the median over the steady
  steps of its training span (``busy``: for ddg and fr it includes the wait for the delayed
  gradient on the backward link, given apart as ``bwd_wait``, the rank's ``recv_wait_s`` minus its
  waits for input) and of the time between the starts of consecutive training spans (``period``,
  the pipeline's step time as that stage sees it);
- memory, from summary.json: what each module held for its delay (``held_bytes_peak``), and each
  rank's peak resident set size; beside them, the bytes one local-loss training step's graph
  saves (counted here in one process with ``saved_tensors_hooks``; the local regime frees it at
  the end of the step);
- wire bytes per step and stage boundary from the shapes and dtypes (activation or gradient, the
  fixed-size header that carries the labels), checked against the transport's own
  counters (``sent_bytes`` of the forward link, ``grad_sent_bytes`` of the backward one).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import markdown_table, run, torchrun_cmd, workload, write_results

from trgl_pipe.config import load_config
from trgl_pipe.context import build_context
from trgl_pipe.runtime.layout import slot_samples
from trgl_pipe.runtime.transport import HEADER
from trgl_pipe.watch.spans import read_spans

REGIMES = {
    "local": ["train.regime=parallel"],
    "ddg": ["train.regime=ddg"],
    "fr": ["train.regime=fr"],
}
MIB = 2**20
LABEL_BYTES = 8  # int64, in the header


def link_bytes(
    sample_shape: tuple[int, ...], dtype: torch.dtype, batch: int, max_batch: int
) -> dict[str, int]:
    """Bytes one training message puts on a link of the gloo transport: the payload (an activation
    forward, or ∂loss/∂input backward: the same shape), the header (8 counters and room for
    ``max_batch`` labels, whatever the batch). Nothing returns to the sender: its room is the
    receive posted ahead (until 2026-12-08 an int64 credit came back for every message)."""
    payload = batch * math.prod(sample_shape) * torch.empty((), dtype=dtype).element_size()
    header = (HEADER + max_batch) * LABEL_BYTES
    return {"payload": payload, "header": header, "total": payload + header}


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view and its base count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def overrides(args: argparse.Namespace, k: int, out_dir: Path, regime: str) -> list[str]:
    """The benchmarks' standard run (equal-depth split, TRGL off: ddg and fr refuse it), one thread
    per rank, timeline on, in ``regime``."""
    return [
        *workload(args, out_dir, k, split="depth"),
        "trgl.enabled=false",
        "train.num_threads=1",
        "log.timeline=true",
        *REGIMES[regime],
    ]


def shapes_and_local_graph(args: argparse.Namespace, k: int) -> dict[str, Any]:
    """In one process, as a rank does it: each stage's output shape and dtype (what crosses each
    boundary) and the bytes one local-loss training step's graph saves (body and head)."""
    cfg = load_config(None, overrides(args, k, Path(tempfile.mkdtemp()), "local"))
    ctx = build_context(cfg, torch.device("cpu"))
    x = torch.randn(args.batch, *ctx.input_shape)
    y = torch.randint(0, 10, (args.batch,))
    samples, graphs = [], []
    for i in range(ctx.num_modules):
        stage = ctx.build_stage(i)
        saved: list[torch.Tensor] = []

        def pack(t: torch.Tensor, saved: list = saved) -> torch.Tensor:
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = stage.train_step(x, y)
        graphs.append(storage_bytes(saved))
        samples.append((tuple(out.shape[1:]), out.dtype))
        x = out
    return {
        "partition": [list(p) for p in ctx.partition],
        "samples": samples,
        "graph_bytes": graphs,
        "max_batch": slot_samples(cfg.data.batch_size, cfg.data.eval_batch_size),
    }


def run_once(args: argparse.Namespace, k: int, regime: str, out_dir: Path) -> dict[str, Any]:
    """One torchrun pipeline; per stage its step timings, memory and counted bytes."""
    run(torchrun_cmd(k, overrides(args, k, out_dir, regime)), timeout=900, env={"OMP_NUM_THREADS": "1"})
    summary = json.loads((out_dir / "summary.json").read_text())
    events = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    stages = []
    for rank in sorted(summary["ranks"], key=lambda r: r["rank"]):
        r = rank["rank"]
        spans = [s for _, seg in read_spans(out_dir / "spans" / f"rank{r}.tsv") for s in seg]
        train = [(a, b) for c, a, b in spans if c == "compute"]
        steady = train[args.skip : len(train) - args.skip_end]
        input_s = sum(b - a for c, a, b in spans if c == "input")
        (module,) = [m for m in summary["modules"] if m["index"] == rank["modules"][0]]
        eval_samples = sum(
            e["count"] for e in events if e["event"] == "eval" and e["module"] == module["index"]
        )
        stages.append(
            {
                "busy_ms": 1000 * statistics.median(b - a for a, b in steady),
                "period_ms": 1000 * statistics.median(b[0] - a[0] for a, b in itertools.pairwise(steady)),
                "bwd_wait_ms": 1000 * max(0.0, rank["recv_wait_s"] - input_s) / len(train),
                "steps": len(train),
                "held_bytes": module.get("held_bytes_peak", 0),
                "held_batches": module.get("held_batches_peak", 0),
                "applied": module["num_steps"],
                "rss_bytes": rank["peak_memory_bytes"],
                "sent_bytes": rank["sent_bytes"],
                "grad_sent_bytes": rank.get("grad_sent_bytes"),
                "train_samples": rank["train_samples"],
                "eval_samples": eval_samples,
            }
        )
    return {"partition": summary["partition"], "stages": stages}


def spread(values: list[float], digits: int = 3) -> str:
    """median (min–max) of the rounds."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def check_wire(k: int, info: dict[str, Any], runs: list[dict[str, Any]], batch: int) -> list[str]:
    """Every run's counted bytes against the bytes the shapes give; the mismatches (none expected)."""
    problems = []
    for result in runs:
        if result["partition"] != info["partition"]:
            problems.append(f"K={k}: partition {result['partition']} != {info['partition']}")
        for s, stage in enumerate(result["stages"]):
            if s < k - 1:  # forward: every training and evaluation sample's activation
                shape, dtype = info["samples"][s]
                per_sample = link_bytes(shape, dtype, 1, 0)["payload"]
                expected = (stage["train_samples"] + stage["eval_samples"]) * per_sample
                if stage["sent_bytes"] != expected:
                    problems.append(
                        f"K={k} {result['regime']} stage {s}: sent {stage['sent_bytes']} != {expected}"
                    )
            if s > 0 and result["regime"] != "local":  # backward: one gradient per applied update
                shape, dtype = info["samples"][s - 1]
                expected = stage["applied"] * link_bytes(shape, dtype, batch, 0)["payload"]
                if stage["grad_sent_bytes"] != expected:
                    problems.append(
                        f"K={k} {result['regime']} stage {s}: "
                        f"grad sent {stage['grad_sent_bytes']} != {expected}"
                    )
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=10, help="first training steps left out of the timings")
    parser.add_argument("--skip-end", type=int, default=4, help="last training steps left out")
    args = parser.parse_args()
    infos = {k: shapes_and_local_graph(args, k) for k in args.ks}
    results: dict[int, list[dict[str, Any]]] = {k: [] for k in args.ks}
    root = Path(tempfile.mkdtemp(prefix="delayed_cost_"))
    for rnd in range(args.rounds):
        for k in args.ks:
            for regime in REGIMES:
                result = run_once(args, k, regime, root / f"k{k}_{regime}_{rnd}")
                results[k].append({"round": rnd, "regime": regime, **result})
                busy = [round(s["busy_ms"], 1) for s in result["stages"]]
                print(f"round {rnd} K={k} {regime}: busy ms per stage {busy}", flush=True)
    rows, problems, wire = [], [], []
    for k in args.ks:
        info, runs = infos[k], results[k]
        problems += check_wire(k, info, runs, args.batch)
        by = {(r["round"], r["regime"]): r for r in runs}
        for regime in REGIMES:
            for s in range(k):
                mine = [by[(rnd, regime)]["stages"][s] for rnd in range(args.rounds)]
                base = [by[(rnd, "local")]["stages"][s] for rnd in range(args.rounds)]
                rows.append(
                    {
                        "K": k,
                        "regime": regime,
                        "stage": s,
                        "busy_ms": round(statistics.median(m["busy_ms"] for m in mine), 1),
                        "busy / local": spread(
                            [m["busy_ms"] / b["busy_ms"] for m, b in zip(mine, base, strict=True)], 2
                        ),
                        "bwd_wait_ms": round(statistics.median(m["bwd_wait_ms"] for m in mine), 1),
                        "period / local": spread(
                            [m["period_ms"] / b["period_ms"] for m, b in zip(mine, base, strict=True)], 2
                        ),
                        "held_MiB": round(mine[0]["held_bytes"] / MIB, 2),
                        "held_batches": mine[0]["held_batches"],
                        "local_step_graph_MiB": round(info["graph_bytes"][s] / MIB, 2),
                        "rss_MiB": round(statistics.median(m["rss_bytes"] for m in mine) / MIB),
                        "rss / local": spread(
                            [m["rss_bytes"] / b["rss_bytes"] for m, b in zip(mine, base, strict=True)], 2
                        ),
                    }
                )
        for b in range(k - 1):
            shape, dtype = info["samples"][b]
            msg = link_bytes(shape, dtype, args.batch, info["max_batch"])
            wire.append(
                {
                    "K": k,
                    "boundary": f"{b}→{b + 1}",
                    "sample": "x".join(map(str, shape)) + f" {str(dtype).removeprefix('torch.')}",
                    "activation": msg["payload"],
                    "header_with_labels": msg["header"],
                    "local_bytes_per_step": msg["total"],
                    "ddg_fr_bytes_per_step": 2 * msg["total"],
                    "extra_bytes_per_step": msg["total"],
                }
            )
    if problems:
        raise SystemExit("the transport's counters disagree with the shapes:\n" + "\n".join(problems))
    splits = ", ".join(f"K={k}: {infos[k]['partition']}" for k in args.ks)
    notes = [
        f"ResNet-{args.depth} width {args.width}, embedded Fashion-MNIST 1x28x28, batch {args.batch}, "
        f"equal-depth split (blocks {splits}), {args.steps} training steps per run, timings over steps "
        f"{args.skip}–{args.steps - args.skip_end - 1}; torchrun, gloo, CPU, one thread per rank, "
        "buffer_size 2.",
        "Baseline (local): the local-loss pipeline, train.regime=parallel with trgl.enabled=false "
        "(VanGL: every module trained by its own auxiliary head); ddg and fr train the end-to-end "
        "objective with the papers' delays (module k lags K-1-k steps) and run without the TRGL term.",
        f"{args.rounds} rounds, the three regimes interleaved in each (local, ddg, fr for each K in "
        "turn); every ratio is a run's figure over the local run's of the same round: median (min–max) "
        "over rounds.",
        "The machine (2 vCPUs) was shared with two always-on single-thread training runs and other jobs "
        "while this ran, and a K=4 pipeline puts 4 ranks on 2 cores: absolute times are loaded-machine "
        "figures; the ratios, measured side by side, are the result.",
        "busy_ms: median training span of the stage (for ddg and fr it includes the wait for the "
        "delayed gradient on the backward link; bwd_wait_ms: that wait per step, mean over the run). "
        "period: median time between the stage's consecutive training steps (the pipeline's step time).",
        "held_MiB: what the module kept for its delay at most (summary held_bytes_peak: ddg the saved "
        "tensors of its in-flight graphs plus the weights and BatchNorm buffers of their forward, fr "
        "their inputs); the local regime keeps nothing between steps. local_step_graph_MiB: the tensors "
        "one local-loss training step of that stage saves for its backward (body and auxiliary head), "
        "freed within the step.",
        "rss_MiB: each rank's peak resident set size (summary peak_memory_bytes), which includes the "
        "Python interpreter, torch and the data besides the tensors.",
        "Wire: per training step and stage boundary; a message is the payload, a header of "
        f"({HEADER} + max_batch) int64 that carries the labels (no credit comes back). ddg and fr "
        "send the same message backward (∂loss/∂input, the activation's shape; the header's labels are "
        "unused), so they double the bytes of every boundary. The transport's sent_bytes and "
        "grad_sent_bytes of every run equal the payloads computed from the shapes (checked: the script "
        "stops otherwise).",
    ]
    write_results(
        "delayed_cost",
        "DDG and FR against the local-loss pipeline: step time, memory per stage, wire bytes",
        rows,
        notes,
        extra={
            "tables": [{"title": "Wire bytes per training step and stage boundary", "rows": wire}],
            "runs": {str(k): results[k] for k in args.ks},
        },
    )
    print(markdown_table(wire))


if __name__ == "__main__":
    main()
