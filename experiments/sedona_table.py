"""The table of experiment 9 (docs/results.md §9): SEDONA's searched cut against the depth and the
balanced cut, recomputed from the run folders and the search's record.

    python experiments/sedona_table.py [experiments/runs/sedona]

Per split: its cuts and head depths, the best module's and the last module's test accuracy (mean
± sd over the seeds that ran), the searched split − each other split paired by seed (95% t
interval and the Bonferroni interval over the table's m intervals, which the reading uses),
and a row per search (the one the runs trained, then the others of more-searches/: the authors'
objective, another seed) with its decision and its CPU and wall minutes. Runs record their wall
time only: with one thread it bounds their CPU time from above.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from authors_table import paired, variants

SPLITS = {
    "searched-k4": "searched",
    "searched-cuts-k4": "searched cuts, depth-2 heads",
    "depth-k4": "depth",
    "balanced-k4": "balanced (time)",
}


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} (one seed)"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(found: dict, records: list[dict]) -> str:
    """The table; its last rows are the searches (the one trained above first), each with its
    decision and its cost (every run and search used one thread)."""
    m = sum(1 for name in SPLITS if name != "searched-k4" and found.get(name))
    lines = [
        "| split | cuts (first block of modules 2..4) | head depths | seeds | best test % "
        f"| last module test % | searched − this, paired [95% CI; Bonferroni, m = {m}] | min, 1 thread |",
        "|---|---|---|---|---|---|---|---|",
    ]
    searched = found.get("searched-k4", {})
    for name, label in SPLITS.items():
        runs = found.get(name)
        if not runs:
            continue
        first = runs[min(runs)]
        cuts = [a for a, _ in first.summary["partition"]][1:]
        depth = first.config["aux"]["depth"]
        depths = depth[:-1] if isinstance(depth, list) else [depth] * len(cuts)
        seeds = ", ".join(map(str, sorted(runs)))
        best = _mean_sd([100 * runs[s].summary["best_test_accuracy"] for s in sorted(runs)])
        last = _mean_sd([100 * runs[s].summary["last_module_test_accuracy"] for s in sorted(runs)])
        wall = statistics.fmean(r.summary["wall_time_s"] for r in runs.values()) / 60
        versus = "" if name == "searched-k4" else paired(searched, runs, m)
        lines.append(f"| {label} | {cuts} | {depths} | {seeds} | {best} | {last} | {versus} | {wall:.1f} |")
    for record in records:
        options, config, decision = record["options"], record["config"], record["decision"]
        lines.append(
            f"| search: objective `{options['objective']}`, {options['budget']} meta-steps × "
            f"{options['inner_steps']} unrolled, batch {config['data']['batch_size']} "
            f"| {decision['split']} | "
            f"{decision['depths'][:-1]} | {config['seed']} | | | | "
            f"{record['cpu_s'] / 60:.1f} CPU, {record['wall_s'] / 60:.1f} wall |"
        )
    return "\n".join(lines)


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "runs" / "sedona"
    print(table(variants(root), searches(root)))


def searches(root: Path) -> list[dict]:
    """The records of the experiment's searches: the one its runs trained first, then the others."""
    paths = [root / "search.json", *sorted((root / "more-searches").glob("*.json"))]
    return [json.loads(path.read_text()) for path in paths if path.is_file()]


if __name__ == "__main__":
    main()
