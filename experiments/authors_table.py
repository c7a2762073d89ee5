"""The side-by-side table of experiment 6: trgl_pipe's defaults against the authors' knobs.

    python experiments/authors_table.py [experiments/runs/authors]

Reads every finished run folder ``VARIANT-sSEED`` and prints, per variant, the best module's
test accuracy (chosen on validation) per seed and as mean ± sd, the test accuracy of every
module, and the difference to ``defaults`` paired by seed with its 95% t interval.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trgl_pipe.report import Run, fmt, load_run, mean_std, t_half_width

ORDER = ["defaults", "defaults+init", "defaults+shortcut", "defaults+heads", "authors", "authors-vangl"]


def variants(root: Path) -> dict[str, dict[int, Run]]:
    """variant -> seed -> run, for the finished runs under ``root``."""
    found: dict[str, dict[int, Run]] = {}
    for folder in sorted(root.iterdir()):
        match = re.fullmatch(r"(.+)-s(\d+)", folder.name)
        if match and (folder / "summary.json").is_file():
            found.setdefault(match[1], {})[int(match[2])] = load_run(folder)
    return dict(sorted(found.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99))


def paired(runs: dict[int, Run], base: dict[int, Run], comparisons: int = 1) -> str:
    """Mean difference of the best module's test accuracy to ``base``, paired by seed."""
    diffs = [
        100 * (runs[s].summary["best_test_accuracy"] - base[s].summary["best_test_accuracy"])
        for s in sorted(runs)
        if s in base
    ]
    return interval(diffs, comparisons) if diffs else "-"


def interval(diffs: list[float], comparisons: int = 1) -> str:
    """Mean of paired differences with its 95% t interval and the page's reading of it; with
    ``comparisons`` > 1 also the Bonferroni interval for that many read together, which the
    reading then uses."""
    mean = statistics.fmean(diffs)
    half = t_half_width(diffs)
    if half is None:
        return f"{mean:+.2f} (one seed)"
    text = f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"
    if comparisons > 1:
        half = t_half_width(diffs, comparisons)
        assert half is not None
        text += f"; Bonferroni [{mean - half:+.2f}, {mean + half:+.2f}]"
    reading = "noise" if mean - half <= 0 <= mean + half else "beyond noise"
    return f"{text} {reading}"


def table(found: dict[str, dict[int, Run]]) -> str:
    width = max(len(r.summary["modules"]) for runs in found.values() for r in runs.values())
    header = [
        "variant",
        "seeds",
        "best test % per seed",
        "best test % mean ± sd",
        *[f"module {k} test %" for k in range(width)],
        "− defaults, paired [95% CI]",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = found.get("defaults", {})
    for name, runs in found.items():
        best = [runs[s].summary["best_test_accuracy"] for s in sorted(runs)]
        per_module = [
            fmt(*mean_std([r.summary["modules"][k]["test_accuracy"] for r in runs.values()]), digits=2)
            for k in range(width)
        ]
        cells = [
            name,
            ", ".join(str(s) for s in sorted(runs)),
            " / ".join(f"{100 * b:.2f}" for b in best),
            fmt(*mean_std(best)),
            *per_module,
            "" if name == "defaults" else paired(runs, base),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "runs" / "authors"
    print(table(variants(root)))


if __name__ == "__main__":
    main()
