"""The figures docs/results.md and benchmarks/README.md quote beyond the reports, recomputed.

    python experiments/derived.py

Reads only committed files (experiments/runs/*, benchmarks/results/*.json) and prints: how often
a module's validation accuracy fell between evaluations, per experiment; VanGL across K and
against end-to-end, paired by seed with 95% t intervals; how τ = 3·10⁴ was picked at K = 16 in
experiment 1b; the steps per module of experiment 5; the rates behind experiment 4's speed
figures; single-process memory beside the heaviest rank's; the efficiency benchmark per
partition.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from authors_table import paired, variants  # noqa: E402

RUNS = ROOT / "experiments" / "runs"
RESULTS = ROOT / "benchmarks" / "results"


def summaries(experiment: str) -> dict[str, dict]:
    """run folder name -> summary.json, for the finished runs of an experiment."""
    return {
        p.name: json.loads((p / "summary.json").read_text())
        for p in sorted((RUNS / experiment).iterdir())
        if (p / "summary.json").is_file()
    }


def validation_falls(experiment: str) -> None:
    """Module-runs whose validation accuracy did not rise between evaluations."""
    total, last_fell, last_same, any_fell, drops = 0, 0, 0, [], []
    for name, summary in summaries(experiment).items():
        for module in summary["modules"]:
            history = [100 * e["val_accuracy"] for e in module["history"]]
            total += 1
            last_fell += history[-1] < history[-2]
            last_same += history[-1] == history[-2]
            falls = [a - b for a, b in itertools.pairwise(history) if b < a]
            if falls:
                any_fell.append(f"{name} m{module['index']}: " + " → ".join(f"{h:.1f}" for h in history))
                drops.append(max(falls))
    print(
        f"{experiment}: {total} module-runs; at the last evaluation {last_fell} fell and "
        f"{last_same} stayed equal; {len(any_fell)} fell at some evaluation"
        + (f" (largest fall {max(drops):.1f} points)" if drops else "")
    )
    if len(any_fell) <= 20:  # the many of experiment 5 and its sweep are summarised by the counts
        for line in any_fell:
            print(f"    {line}")


def scarce_last_falls() -> None:
    """Experiment 5: the module-runs that fell at the last evaluation, by run and module."""
    by_group: dict[str, list[str]] = {}
    worst = 0.0
    for name, summary in summaries("scarce").items():
        for module in summary["modules"]:
            history = [100 * e["val_accuracy"] for e in module["history"]]
            if history[-1] < history[-2]:
                by_group.setdefault(name.rsplit("-s", 1)[0], []).append(f"{name[-2:]}:m{module['index']}")
                worst = max(worst, history[-2] - history[-1])
    print(f"scarce, fell at the last evaluation (epoch 25 → 30), largest fall {worst:.2f} points:")
    for group, where in by_group.items():
        print(f"    {group}: {len(where)} ({', '.join(where)})")


def across_k(experiment: str, method: str, ks: tuple[int, ...]) -> None:
    """A method at one K minus at the next larger K (and the smallest minus the largest), then the
    smallest K minus end-to-end: best module's test accuracy, paired by seed."""
    found = variants(RUNS / experiment)
    print(f"{experiment}: {method}, best module's test accuracy, paired by seed [95% t interval]")
    pairs = [*itertools.pairwise(ks), (ks[0], ks[-1])]
    for small, large in pairs:
        diff = paired(found[f"{method}-k{small}"], found[f"{method}-k{large}"])
        print(f"    K={small} − K={large}: {diff}")
    print(f"    K={ks[0]} − E2E: {paired(found[f'{method}-k{ks[0]}'], found['e2e'])}")


def tau_choice() -> None:
    """Experiment 1b: at seed 0 and K = 16, each τ's best module, on validation and on test."""
    rows = {n: s for n, s in summaries("tau-full").items() if "-k16-" in n and n.endswith("-s0")}
    depth = summaries("depth")
    rows["depth/trgl-k16-s0 (τ=1e4)"] = depth["trgl-k16-s0"]
    rows["depth/vangl-k16-s0"] = depth["vangl-k16-s0"]
    print("tau-full, K=16, seed 0: best module's validation / test %")
    for name, s in sorted(rows.items(), key=lambda kv: -kv[1]["best_test_accuracy"]):
        print(f"    {name}: {100 * s['best_val_accuracy']:.2f} / {100 * s['best_test_accuracy']:.2f}")
    seeds = [n for n in summaries("tau-full") if n.startswith("trgl-tau3e4-k16-")]
    print(f"    seeds run for τ=3e4 at K=16: {', '.join(seeds)}")
    found = {**variants(RUNS / "tau-full"), **variants(RUNS / "depth")}
    print(f"    τ=3e4 − VanGL at K=16, paired: {paired(found['trgl-tau3e4-k16'], found['vangl-k16'])}")
    print(
        "    seed 1 alone: "
        + paired({1: found["trgl-tau3e4-k16"][1]}, {1: found["vangl-k16"][1]}).replace("(one seed)", "")
    )


def scarce_steps() -> None:
    steps = {m["num_steps"] for s in summaries("scarce").values() for m in s["modules"]}
    epochs = {s["epochs"] for s in summaries("scarce").values()}
    print(f"scarce: steps per module {sorted(steps)}, epochs {sorted(epochs)}")


def pipeline_rates() -> None:
    pipeline = summaries("pipeline")
    depth = summaries("depth")
    pipe = pipeline["pipeline-k4-s0"]["samples_per_s"]
    one = pipeline["single-k4-1thread-s0"]["samples_per_s"]
    two = {n: depth[n]["samples_per_s"] for n in ("trgl-k4-s0", "trgl-k4-s1", "trgl-k4-s2")}
    print(f"pipeline: 4 ranks × 1 thread {pipe:.0f} samples/s;", end=" ")
    print(f"1 process × 1 thread {one:.0f} ({pipe / one:.3f}×)")
    for name, rate in two.items():
        print(f"    1 process × 2 threads, depth/{name}: {rate:.0f} samples/s;", end=" ")
        print(f"pipeline / it {pipe / rate:.3f}")
    low, high = min(two.values()), max(two.values())
    print(f"    the three 2-thread runs (same work, seeds differ): {low:.0f}–{high:.0f},", end=" ")
    print(f"max/min {high / low:.3f}")


def memory() -> None:
    data = json.loads((RESULTS / "memory_meta_all.json").read_text())
    plain = {r["setting"]: r["heaviest_rank_MiB"] for r in data["rows"] if r["split"] == "e2e plain"}
    print("memory (benchmarks/results/memory_meta_all.json), against plain end-to-end:")
    print("    setting, K, split: heaviest rank × (saves), single process × (saves), single / heaviest")
    for r in data["rows"]:
        if "single_process_MiB" in r:
            base = plain[r["setting"]]
            rank, single = r["heaviest_rank_MiB"] / base, r["single_process_MiB"] / base
            print(
                f"    {r['setting']}, K={r['K']}, {r['split']}: {rank:.3f} ({100 * (1 - rank):.1f}%), "
                f"{single:.3f} ({100 * (1 - single):.1f}%), "
                f"{r['single_process_MiB'] / r['heaviest_rank_MiB']:.4f}"
            )


def efficiency() -> None:
    data = json.loads((RESULTS / "efficiency_k2.json").read_text())
    by_partition: dict[str, list[dict]] = {}
    for row in data["rows"]:
        by_partition.setdefault(row["partition"], []).append(row)
    print("efficiency (benchmarks/results/efficiency_k2.json), per partition: median (min–max)")
    keys = ("pipeline_samples_per_s", "efficiency_vs_alone", "efficiency_vs_corun", "bottleneck_busy")
    for partition, rows in by_partition.items():
        print(f"    {partition}, rounds {', '.join(str(r['repeat']) for r in rows)}:")
        for key in keys:
            values = [r[key] for r in rows]
            print(f"        {key}: {statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})")


def main() -> None:
    for experiment in ("depth", "tau-sweep", "tau-full", "blockwise", "pipeline", "scarce-sweep", "scarce"):
        validation_falls(experiment)
    scarce_last_falls()
    print()
    across_k("depth", "vangl", (2, 4, 8, 16))
    across_k("depth", "trgl", (2, 4, 8, 16))
    across_k("scarce", "vangl", (2, 4, 8, 16))
    across_k("scarce", "trgl-halves", (2, 4, 8, 16))
    print()
    tau_choice()
    print()
    scarce_steps()
    pipeline_rates()
    print()
    memory()
    efficiency()


if __name__ == "__main__":
    main()
