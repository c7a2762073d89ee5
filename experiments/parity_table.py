"""The tables of benchmarks/vs_authors.md from the runs of experiments/parity_authors.py --json.

    python experiments/parity_table.py benchmarks/results/vs_authors_6epoch

Reads every ``<schedule>-s<seed>.json`` in the folder and prints, in Markdown: both codes' test
accuracy under both reading rules (trgl_pipe's: the module best on validation at the last
evaluation; the authors': the highest test accuracy over every epoch and module), mean ± sd over
seeds, with how many steps the two codes were compared on and found equal; then the differences
paired by seed (the same subset, batches and initial weights) with a 95% t interval, "noise" when
it contains 0. Writes the same as ``summary.md`` and ``summary.json`` (with the machine) beside
the runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from authors_table import interval  # noqa: E402

SCHEDULE_NAMES = {
    "constant": "constant (their `-lrd 0`)",
    "cosine": "cosine, T_max 30000, floor 0.001 (their `-lrd 1`)",
    "run-cosine": "cosine to 0 over the run (trgl_pipe's, not in their code)",
}
CODE_NAMES = {"authors": "the authors' code", "trgl_pipe": "trgl_pipe"}
SHORT = {"constant": "`-lrd 0`", "cosine": "`-lrd 1`", "run-cosine": "cosine to 0"}
PROTOCOLS = {"trgl_pipe": "trgl_pipe's protocol", "authors": "the authors' protocol"}


def load(folder: Path) -> dict[tuple[str, int], dict[str, Any]]:
    runs = {}
    for path in sorted(folder.glob("*-s*.json")):
        run = json.loads(path.read_text())
        runs[(run["schedule"], run["seed"])] = run
    if not runs:
        raise SystemExit(
            f"error: no <schedule>-s<seed>.json in {folder}; run experiments/parity_authors.py --json"
        )
    return runs


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f} (one seed)"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def paired(diffs: list[float]) -> str:
    if all(d == 0 for d in diffs):
        return "0 at every seed: equal"
    return interval(diffs)


def accuracy(run: dict[str, Any], code: str, protocol: str) -> float | None:
    values = run["codes"].get(code)
    return None if values is None else 100 * values[protocol]


def render(runs: dict[tuple[str, int], dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The Markdown tables and their numbers (JSON-ready) from the runs by (schedule, seed)."""
    schedules = [s for s in SCHEDULE_NAMES if any(k[0] == s for k in runs)]
    lines = [
        "| schedule | code | seeds | trgl_pipe's protocol, % per seed | mean ± sd | best module per seed "
        "| the authors' protocol, % per seed | mean ± sd | module-steps: parameter checksums equal "
        "(final weights) / losses equal bit for bit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {"rows": [], "paired": []}
    for schedule in schedules:
        seeds = sorted(seed for s, seed in runs if s == schedule)
        for code in ("authors", "trgl_pipe"):
            got = [runs[(schedule, seed)] for seed in seeds if code in runs[(schedule, seed)]["codes"]]
            if not got:
                continue
            ours = [accuracy(r, code, "trgl_pipe") for r in got]
            theirs = [accuracy(r, code, "authors") for r in got]
            compared = [r["compared"] for r in got if r["compared"]]
            equal = (
                f"{sum(c['parameter_checksums_equal'] for c in compared)} of "
                f"{sum(c['module_steps'] for c in compared)} (final weights "
                f"{'equal' if all(c['final_states_equal'] for c in compared) else 'differ'}) / "
                f"{sum(c['losses_equal_bit_for_bit'] for c in compared)}"
                if compared
                else "not compared (trgl_pipe alone)"
            )
            lines.append(
                f"| {SCHEDULE_NAMES[schedule]} | {CODE_NAMES[code]} | {', '.join(map(str, seeds))} | "
                f"{' / '.join(f'{v:.2f}' for v in ours)} | {mean_sd(ours)} | "
                f"{' / '.join(str(r['codes'][code]['best_module']) for r in got)} | "
                f"{' / '.join(f'{v:.2f}' for v in theirs)} | {mean_sd(theirs)} | {equal} |"
            )
            summary["rows"].append(
                {
                    "schedule": schedule,
                    "code": code,
                    "seeds": seeds,
                    "trgl_pipe_protocol": ours,
                    "authors_protocol": theirs,
                }
            )
    lines += [
        "",
        "| comparison (paired by seed) | protocol | per seed | mean [95% t interval] |",
        "|---|---|---|---|",
    ]

    def compare(label: str, a: tuple[str, str], b: tuple[str, str], protocol_a: str, protocol_b: str) -> None:
        seeds = sorted(
            seed
            for s, seed in runs
            if s == a[0]
            and (b[0], seed) in runs
            and a[1] in runs[(a[0], seed)]["codes"]
            and b[1] in runs[(b[0], seed)]["codes"]
        )
        if not seeds:
            return
        diffs = [
            accuracy(runs[(a[0], seed)], a[1], protocol_a) - accuracy(runs[(b[0], seed)], b[1], protocol_b)
            for seed in seeds
        ]
        protocol = PROTOCOLS[protocol_a] if protocol_a == protocol_b else "the authors' − trgl_pipe's"
        lines.append(f"| {label} | {protocol} | {', '.join(f'{d:+.2f}' for d in diffs)} | {paired(diffs)} |")
        summary["paired"].append({"comparison": label, "protocol": protocol, "seeds": seeds, "diffs": diffs})

    for protocol in ("trgl_pipe", "authors"):
        for schedule in ("constant", "cosine"):
            compare(
                f"the authors' code − trgl_pipe, {SHORT[schedule]}",
                (schedule, "authors"),
                (schedule, "trgl_pipe"),
                protocol,
                protocol,
            )
        compare(
            "`-lrd 1` − `-lrd 0` (trgl_pipe)",
            ("cosine", "trgl_pipe"),
            ("constant", "trgl_pipe"),
            protocol,
            protocol,
        )
        compare(
            "cosine to 0 − `-lrd 0` (trgl_pipe)",
            ("run-cosine", "trgl_pipe"),
            ("constant", "trgl_pipe"),
            protocol,
            protocol,
        )
        compare(
            "cosine to 0 − `-lrd 1` (trgl_pipe)",
            ("run-cosine", "trgl_pipe"),
            ("cosine", "trgl_pipe"),
            protocol,
            protocol,
        )
    for schedule in schedules:
        compare(
            f"the authors' protocol − trgl_pipe's, {SHORT[schedule]} (trgl_pipe)",
            (schedule, "trgl_pipe"),
            (schedule, "trgl_pipe"),
            "authors",
            "trgl_pipe",
        )
    return "\n".join(lines), summary


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    runs = load(args.folder)
    text, summary = render(runs)
    print(text)
    first = next(iter(runs.values()))
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = f"{names[0]} ({len(names)} logical CPUs)" if names else cpu
    summary.update(
        {
            "machine": {"cpu": cpu, "system": platform.platform()},
            "authors": {k: first["authors"][k] for k in ("repository", "commit", "script")},
            "versions": first["versions"],
            "threads": first["threads"],
            "data": first["data"],
            "commands": {f"{s}-s{seed}": r["command"] for (s, seed), r in sorted(runs.items())},
            "their_commands": {
                f"{s}-s{seed}": r["authors"]["command"]
                for (s, seed), r in sorted(runs.items())
                if r["authors"]["run"]
            },
            "wall_s": {
                f"{s}-s{seed}": {code: round(v["wall_s"], 1) for code, v in r["codes"].items()}
                for (s, seed), r in sorted(runs.items())
            },
        }
    )
    (args.folder / "summary.md").write_text(text + "\n")
    (args.folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
