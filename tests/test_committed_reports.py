"""Every committed report of docs/results.md is what its committed run folders give today."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _reports():
    """experiments/reports.py as a module (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location("reports", ROOT / "experiments" / "reports.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reports", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.golden
def test_every_committed_report_regenerates_from_its_runs() -> None:
    pytest.importorskip("matplotlib")  # which figures a report names depends on it
    reports = _reports()
    names = [*reports.BY_NAME, *reports.PAGE_TABLES]
    assert reports.check(names) == [], "run python experiments/reports.py and commit the result"


def test_every_committed_figure_is_named_once() -> None:
    for report in (ROOT / "docs" / "results").glob("*/report.md"):
        figures = [line.split("](")[1] for line in report.read_text().split("\n") if line.startswith("![")]
        assert len(figures) == len(set(figures)), f"{report} shows one figure under two captions"


def test_the_check_sees_a_report_that_drifted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    reports = _reports()
    stale = tmp_path / "pipeline"
    stale.mkdir()
    committed = ROOT / "docs" / "results" / "pipeline"
    (stale / "report.md").write_text((committed / "report.md").read_text().replace("88.55", "88.56", 1))
    for png in committed.glob("*.png"):
        (stale / png.name).write_bytes(b"")
    monkeypatch.setattr(reports, "RESULTS", tmp_path)
    assert reports.check(["pipeline"]) == [f"{tmp_path / 'pipeline' / 'report.md'}"]
    (stale / "report.md").write_text((committed / "report.md").read_text())
    assert reports.check(["pipeline"]) == []
    (stale / "extra.png").write_bytes(b"")
    assert reports.check(["pipeline"]) == [f"{tmp_path / 'pipeline'} (its figures)"]


def test_the_tau_full_report_holds_the_depth_runs_it_compares_with() -> None:
    """Experiment 1b's table puts the depth runs' VanGL and τ=10⁴ columns beside its own runs."""
    reports = _reports()
    with reports.at_root():
        folders = reports.BY_NAME["tau-full"].folders()
    runs = ROOT / "experiments" / "runs"
    twins = ("vangl-k4-", "trgl-k4-", "vangl-k16-", "trgl-k16-")
    expected = {p for p in (runs / "tau-full").iterdir()}
    expected |= {p for p in (runs / "depth").iterdir() if p.name.startswith(twins)}
    assert {ROOT / p for p in folders} == expected
    assert len(expected) == 19


@pytest.mark.golden
def test_the_derived_figures_of_the_results_page_recompute(capsys: pytest.CaptureFixture[str]) -> None:
    """experiments/derived.py reads the committed runs and prints what docs/results.md quotes."""
    spec = importlib.util.spec_from_file_location("derived", ROOT / "experiments" / "derived.py")
    derived = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derived)
    derived.main()
    out = capsys.readouterr().out
    assert "scarce: 183 module-runs; at the last evaluation 46 fell and 3 stayed equal" in out
    assert "scarce: steps per module [1200], epochs [30]" in out
    assert "K=2 − K=16: +2.86 [+2.79, +2.92] beyond noise" in out  # VanGL, full data
    assert "K=2 − E2E: +0.31 [-0.72, +1.34] noise" in out
    assert "τ=3e4 − VanGL at K=16, paired: +0.71 [-1.83, +3.25] noise" in out


def test_the_competitors_table_names_every_built_in_head(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))  # it imports its sibling modules
    import competitors_table

    kinds = ("conv", "dgl_cnn", "dgl_mlp_sr", "sedona")
    labels = {kind: competitors_table.head({"aux": {"type": kind, "depth": 2}}) for kind in kinds}
    assert labels == {
        "conv": "conv 3×3, pool 2, linear",
        "dgl_cnn": "DGL's CNN head",
        "dgl_mlp_sr": "DGL's MLP-SR head",
        "sedona": "SEDONA's decoder, depth 2",
    }


def test_experiment_9s_searched_runs_trained_what_the_committed_search_chose() -> None:
    """The searched rows of docs/results.md §9 ran the split and heads of the committed search.yaml
    (and the searched-cuts rows its split with the baselines' depth-2 heads)."""
    import json

    import yaml

    root = ROOT / "experiments" / "runs" / "sedona"
    chosen = yaml.safe_load((root / "search.yaml").read_text())
    record = json.loads((root / "search.json").read_text())
    assert record["decision"]["split"] == chosen["model"]["split"]
    runs = sorted(root.glob("searched-*k4-s*"))
    assert runs, "no searched runs committed"
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert [a for a, _ in summary["partition"]][1:] == chosen["model"]["split"], run
        want = chosen["aux"]["depth"] if run.name.startswith("searched-k4") else 2
        assert config["aux"]["depth"] == want and config["aux"]["type"] == "sedona", run
