"""The paired differences of experiment 5 (docs/results.md §5b) recomputed from the run folders.

    python experiments/scarce_table.py [experiments/runs/scarce]

Per K: TRGL-halves − VanGL, VanGL − E2E and TRGL − E2E, best module's test accuracy paired by
seed with the 95% t interval; then how TRGL − VanGL at K = 4, 8, 16 differs from K = 2 and 8
(the contrasts across K that the section's reading quotes).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from authors_table import paired, variants

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trgl_pipe.report import t_half_width

KS = (2, 4, 8, 16)


def gap(found: dict, k: int) -> dict[int, float]:
    """seed -> TRGL − VanGL at K = k, in points."""
    trgl, vangl = found[f"trgl-halves-k{k}"], found[f"vangl-k{k}"]
    return {
        s: 100 * (trgl[s].summary["best_test_accuracy"] - vangl[s].summary["best_test_accuracy"])
        for s in sorted(trgl)
        if s in vangl
    }


def contrast(a: dict[int, float], b: dict[int, float]) -> str:
    """Mean of a − b over the seeds both have, with its 95% t interval."""
    diffs = [a[s] - b[s] for s in sorted(a) if s in b]
    mean, half = statistics.fmean(diffs), t_half_width(diffs)
    per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
    if half is None:
        return f"{per_seed}: {mean:+.2f} (one seed)"
    return f"{per_seed}: {mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "runs" / "scarce")
    found = variants(root)
    e2e = found["e2e"]
    print("| K | TRGL − VanGL | VanGL − E2E | TRGL − E2E |")
    print("|---|---|---|---|")
    for k in KS:
        trgl, vangl = found[f"trgl-halves-k{k}"], found[f"vangl-k{k}"]
        print(f"| {k} | {paired(trgl, vangl)} | {paired(vangl, e2e)} | {paired(trgl, e2e)} |")
    print()
    for k, base in ((4, 2), (8, 2), (16, 2), (16, 8)):
        print(f"(TRGL − VanGL) at K = {k} minus at K = {base}: {contrast(gap(found, k), gap(found, base))}")


if __name__ == "__main__":
    main()
