"""Regenerate every committed report of docs/results.md from the committed run folders.

    python experiments/reports.py                 # rewrite every report (Markdown and figures)
    python experiments/reports.py depth scarce    # only these
    python experiments/reports.py --check         # compare the committed reports with a regeneration

Each report is ``python -m trgl_pipe.report`` over a fixed set of run folders with a fixed title,
written to ``docs/results/<name>/``; the authors' table of experiment 6 is written into
benchmarks/vs_authors.md, the paired table of experiment 7 into docs/results.md §7. ``--check``
rebuilds the Markdown only (figures are not drawn: their bytes depend on the matplotlib version)
and exits 1 naming every report that differs; CI runs it (tests/test_committed_reports.py), so a
report cannot drift from its runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from authors_table import table as authors_table  # noqa: E402
from authors_table import variants  # noqa: E402
from competitors_table import table as competitors_table  # noqa: E402
from sedona_table import searches  # noqa: E402
from sedona_table import table as sedona_table  # noqa: E402

from trgl_pipe import report  # noqa: E402

RUNS = Path("experiments/runs")
RESULTS = Path("docs/results")
AUTHORS_PAGE = Path("benchmarks/vs_authors.md")
RESULTS_PAGE = Path("docs/results.md")


@dataclass(frozen=True)
class Report:
    """One committed report: its folder under docs/results, title and run folders (globs)."""

    name: str
    title: str
    runs: tuple[str, ...]

    def folders(self) -> list[Path]:
        found = sorted({p for pattern in self.runs for p in Path().glob(pattern)})
        finished = [p for p in found if (p / "summary.json").is_file()]
        if not finished:
            raise SystemExit(f"error: no finished run folder matches {self.runs} (report {self.name})")
        return finished


REPORTS = (
    Report(
        "tau-sweep",
        "Experiment 0: the τ range at K = 16 (10,000 training images, ResNet-38 w8, 3 epochs, one seed)",
        (f"{RUNS}/tau-sweep/*",),
    ),
    Report(
        "depth",
        "Experiment 1: end-to-end against parallel VanGL and TRGL at K = 2, 4, 8, 16 "
        "(full Fashion-MNIST, ResNet-38 w8, 2 epochs)",
        (f"{RUNS}/depth/*",),
    ),
    # The τ=10⁴ and VanGL columns of experiment 1b are experiment 1's runs at K = 4 and 16.
    Report(
        "tau-full",
        "Experiment 1b: the τ range on full Fashion-MNIST at K = 4 and 16 "
        "(with the depth runs at τ=10⁴ and VanGL)",
        (
            f"{RUNS}/tau-full/*",
            *(f"{RUNS}/depth/{method}-k{k}-s*" for k in (4, 16) for method in ("vangl", "trgl")),
        ),
    ),
    Report(
        "blockwise",
        "Experiment 2: block-wise sequential, multi-lap and parallel "
        "(ResNet-20 w8, K=9, 5,500 training images, 2 epochs)",
        (f"{RUNS}/blockwise/*",),
    ),
    Report("pipeline", "Experiment 4: the pipeline against one process (K=4)", (f"{RUNS}/pipeline/*",)),
    Report(
        "scarce-sweep",
        "Experiment 5a: τ of TRGL-halves on 5,000 images (K = 16, tuning seed 100)",
        (f"{RUNS}/scarce-sweep/*",),
    ),
    Report(
        "scarce",
        "Experiment 5: data-scarce, 5,000 images, K = 2 to 16 (fresh seeds 0, 1, 2)",
        (f"{RUNS}/scarce/*",),
    ),
    Report(
        "authors",
        "Experiment 6: the authors' setup against trgl_pipe's defaults (10,000 images, ResNet-20, K = 4)",
        (f"{RUNS}/authors/*",),
    ),
    # beside experiment 5's VanGL and TRGL runs at the same K (the same seeds, data and weights)
    Report(
        "competitors",
        "Experiment 7: InfoPro, PredSim and DGL's head against VanGL and TRGL (5,000 images, fresh seeds)",
        (
            f"{RUNS}/competitors/*",
            *(f"{RUNS}/scarce/{method}-k{k}-s*" for k in (4, 16) for method in ("vangl", "trgl-halves")),
        ),
    ),
    Report(
        "quickstart",
        "Experiment 8: the quickstart in one process: TRGL (float32 and bf16 on the wire) and VanGL",
        (f"{RUNS}/quickstart/*",),
    ),
    Report(
        "sedona",
        "Experiment 9: SEDONA's searched cut against the depth and balanced cuts "
        "(5,000 images, K = 4, VanGL with SEDONA's heads, fresh seeds)",
        (f"{RUNS}/sedona/*",),
    ),
    Report(
        "man",
        "Experiment 10: MAN with its weights sent back every N = 1, 10, 50 steps, and VanGL "
        "(5,000 images, K = 4, 10 epochs, seeds 0-2)",
        (f"{RUNS}/man/*",),
    ),
    # beside experiment 5a's VanGL and TRGL runs on the same tuning seed
    Report(
        "fair-sweep",
        "Experiment 11a: every method's knob over five values (5,000 images, K = 16, tuning seed 100)",
        (f"{RUNS}/fair-sweep/*", f"{RUNS}/scarce-sweep/*"),
    ),
)
BY_NAME = {r.name: r for r in REPORTS}
AUTHORS_TABLE = "authors-table"  # the table of benchmarks/vs_authors.md
COMPETITORS_TABLE = "competitors-table"  # the paired table of docs/results.md §7
SEDONA_TABLE = "sedona-table"  # the table of docs/results.md §9


@contextmanager
def at_root() -> Iterator[None]:
    """Work from the checkout's root, so the reports name their runs by relative paths."""
    before = Path.cwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(before)


@contextmanager
def no_drawing() -> Iterator[None]:
    """Build the figures' artists but write no image: the Markdown is unchanged, and fast."""
    from matplotlib.figure import Figure

    skip = lambda *args, **kwargs: None  # noqa: E731
    with mock.patch.object(Figure, "savefig", skip), mock.patch.object(Figure, "tight_layout", skip):
        yield


def write(spec: Report, out: Path) -> Path:
    """Build one report into ``out``, removing figures that the report no longer names."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    return report.build_report(spec.folders(), out, spec.title)


def replace_table(page: Path, text: str, table: str) -> str:
    """``text`` (of ``page``) with its Markdown table whose header equals ``table``'s first line replaced."""
    lines, new = text.split("\n"), table.strip("\n").split("\n")
    if new[0] not in lines:
        raise SystemExit(f"error: {page} has no table headed {new[0]!r}; put the table back")
    start = lines.index(new[0])
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[:start] + new + lines[end:])


def page_table(name: str) -> tuple[Path, str]:
    """The page a table report lives in and that page's text with the table regenerated."""
    if name == AUTHORS_TABLE:
        page, table = AUTHORS_PAGE, authors_table(variants(RUNS / "authors"))
    elif name == SEDONA_TABLE:
        page, table = RESULTS_PAGE, sedona_table(variants(RUNS / "sedona"), searches(RUNS / "sedona"))
    else:
        found = variants(RUNS / "competitors"), variants(RUNS / "scarce")
        page, table = RESULTS_PAGE, competitors_table(*found)
    return page, replace_table(page, page.read_text(), table)


PAGE_TABLES = (AUTHORS_TABLE, COMPETITORS_TABLE, SEDONA_TABLE)


def check(names: list[str]) -> list[str]:
    """The reports among ``names`` whose committed Markdown differs from a regeneration."""
    stale = []
    with at_root(), no_drawing(), tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name in PAGE_TABLES:
                page, text = page_table(name)
                if text != page.read_text():
                    stale.append(f"{page} (its table)")
                continue
            committed = RESULTS / name / "report.md"
            fresh = report.build_report(BY_NAME[name].folders(), Path(tmp) / name, BY_NAME[name].title)
            if not committed.is_file() or committed.read_text() != fresh.read_text():
                stale.append(str(committed))
                continue
            lines = fresh.read_text().split("\n")
            named = {line.split("](")[1].rstrip(")") for line in lines if line.startswith("![")}
            if named != {p.name for p in (RESULTS / name).glob("*.png")}:
                stale.append(f"{RESULTS / name} (its figures)")
    return stale


def main() -> int:
    choices = [*BY_NAME, *PAGE_TABLES]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="some of: " + ", ".join(choices))
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if unknown := [n for n in args.names if n not in choices]:
        parser.error(f"unknown report {', '.join(unknown)}; choose from {', '.join(choices)}")
    names = args.names or choices
    if args.check:
        stale = check(names)
        for path in stale:
            print(f"stale: {path} differs from its runs; run python experiments/reports.py")
        print(f"{len(names) - len(stale)} of {len(names)} reports match their runs")
        return 1 if stale else 0
    with at_root():
        for name in names:
            if name in PAGE_TABLES:
                page, text = page_table(name)
                page.write_text(text)
                print(f"wrote {page} ({name})")
            else:
                print(f"wrote {write(BY_NAME[name], RESULTS / name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
