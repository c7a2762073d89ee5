"""The paired table of experiment 7 (docs/results.md §7) recomputed from the run folders.

    python experiments/competitors_table.py [experiments/runs/competitors] [experiments/runs/scarce]

Per method and K: the classifier F_k each module trains (the methods differ in it, and the head
alone moved accuracy by +2.34 points in benchmarks/vs_authors.md), the best module's test
accuracy (mean ± sd over the seeds that ran), the method − VanGL and TRGL − the method, paired
by seed with the 95% t interval and the Bonferroni interval over the table's m intervals, which
the reading uses (VanGL and TRGL-halves are experiment 5's runs: same data subset and initial
weights per seed). A method whose runs are
not all finished is shown with the seeds it has.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from authors_table import paired, variants

METHODS = {
    "infopro-softmax": "InfoPro (softmax)",
    "infopro-contrast": "InfoPro (contrast)",
    "predsim": "PredSim",
    "dgl-mlp-sr": "DGL (MLP-SR head)",
}
KS = (4, 16)


def head(config: dict) -> str:
    """The classifier F_k of a run's modules, read from its config: a method's own, or the
    ``aux`` section's (trained on the module's loss, or as a probe on the detached output)."""
    objective, aux = config.get("objective", {}), config.get("aux", {})
    name = objective.get("name", "trgl")
    if name == "infopro" and objective.get("infopro_loss", "softmax") == "softmax":
        return "InfoPro's projection head"
    if name == "predsim":
        return "PredSim's prediction head"
    kind = aux.get("type", "conv")
    if kind == "dgl_mlp_sr":
        own = "DGL's MLP-SR head"
    elif kind == "dgl_cnn":
        own = "DGL's CNN head"
    elif kind == "sedona":
        own = f"SEDONA's decoder, depth {aux.get('depth', 1)}"
    else:
        own = f"conv 3×3, pool {aux.get('pool_size', 2)}, linear"
    return f"{own} (a probe)" if name == "infopro" else own


def heads(runs: dict) -> str:
    """The head of a row's runs (one label; every seed of a row trains the same one)."""
    labels = sorted({head(run.config) for run in runs.values()})
    return "; ".join(labels)


def accuracy(runs: dict) -> str:
    """Mean ± sd of the best module's test accuracy, in %, over the seeds given."""
    values = [100 * runs[s].summary["best_test_accuracy"] for s in sorted(runs)]
    if len(values) == 1:
        return f"{values[0]:.2f} (one seed)"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(competitors: dict, scarce: dict) -> str:
    """The table; its reading uses Bonferroni intervals over every paired interval it shows."""
    m = 2 * sum(1 for k in KS for method in METHODS if competitors.get(f"{method}-k{k}"))
    lines = [
        f"| method | head F_k | K | seeds | best test % | − VanGL, paired [95% CI; Bonferroni, m = {m}] "
        f"| TRGL − method, paired [95% CI; Bonferroni, m = {m}] |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in KS:
        vangl, trgl = scarce.get(f"vangl-k{k}", {}), scarce.get(f"trgl-halves-k{k}", {})
        for name, runs in (("VanGL (§5)", vangl), ("TRGL-halves τ=10⁴ (§5)", trgl)):
            if runs:
                seeds = ", ".join(map(str, sorted(runs)))
                lines.append(f"| {name} | {heads(runs)} | {k} | {seeds} | {accuracy(runs)} | | |")
        for method, label in METHODS.items():
            runs = competitors.get(f"{method}-k{k}")
            if not runs:
                continue
            seeds = ", ".join(map(str, sorted(runs)))
            lines.append(
                f"| {label} | {heads(runs)} | {k} | {seeds} | {accuracy(runs)} | {paired(runs, vangl, m)} | "
                f"{paired(trgl, runs, m)} |"
            )
    return "\n".join(lines)


def main() -> None:
    here = Path(__file__).parent / "runs"
    competitors = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "competitors"
    scarce = Path(sys.argv[2]) if len(sys.argv) > 2 else here / "scarce"
    print(table(variants(competitors), variants(scarce)))


if __name__ == "__main__":
    main()
