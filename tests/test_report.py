"""The report command on real run folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trgl_pipe.errors import UserError
from trgl_pipe.report import build_report, fmt, load_run, main, mean_std, rank_table
from trgl_pipe.training.single import run_single


def test_report_pools_seeds_and_draws_figures(tiny, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = []
    for overrides in (
        ["seed=0"],
        ["seed=1"],
        ["trgl.enabled=false"],
        ["train.regime=e2e", "trgl.enabled=false"],
        ["trgl.tau_schedule=adaptive", "trgl.lambda_init=20000", "trgl.h=1000", "trgl.s=2"],
    ):
        cfg = tiny(*overrides)
        run_single(cfg, console_summary=False)
        runs.append(Path(cfg.out_dir))
    report = build_report(runs, tmp_path / "report", "test report")
    text = report.read_text()
    assert "5 runs in 4 groups" in text
    assert "| Par TRGL τ=10000 K=2 n=300 | 2 |" in text  # two seeds pooled
    assert "Par VanGL K=2" in text and "E2E" in text and "TRGL-adaptive" in text
    assert all(f"- `{run}`:" in text for run in runs), "the sources must name every run"
    for name in ("accuracy_vs_depth.png", "kinetic_per_block.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000
    assert list((tmp_path / "report").glob("lambda_*.png")), "no λ figure for the adaptive run"
    assert len(list((tmp_path / "report").glob("curves_*.png"))) == 4


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a finished run folder"):
        build_report([tmp_path], tmp_path / "out", "x")
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2


def test_report_tables_every_rank_of_a_pipeline_run() -> None:
    # The committed runs of experiment 4: one torchrun pipeline (K=4) and its single-process twin.
    folder = Path(__file__).resolve().parents[1] / "experiments" / "runs" / "pipeline"
    piped, single = load_run(folder / "pipeline-k4-s0"), load_run(folder / "single-k4-1thread-s0")
    assert rank_table([single]) == ""
    rows = rank_table([single, piped]).splitlines()[2:]
    assert [row.split(" | ")[1] for row in rows] == ["0", "1", "2", "3"]
    summary_rates = [f"{r['samples_per_s']:.0f}" for r in piped.summary["ranks"]]
    assert [row.split(" | ")[2] for row in rows] == summary_rates


def test_a_single_seed_has_no_spread_and_equal_seeds_show_zero() -> None:
    assert fmt(*mean_std([0.9])) == "90.00"
    assert fmt(*mean_std([0.9, 0.9])) == "90.00 ± 0.00"
    assert fmt(*mean_std([None])) == "-"


def test_trgl_and_vangl_are_paired_by_seed_with_a_t_interval() -> None:
    # The committed depth experiment: K=2, TRGL tau=1e4 against VanGL, seeds 0, 1, 2
    from trgl_pipe.report import paired_rows

    folder = Path(__file__).resolve().parents[1] / "experiments" / "runs" / "depth"
    runs = [load_run(folder / f"{name}-k2-s{seed}") for name in ("trgl", "vangl") for seed in (0, 1, 2)]
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    (row,) = paired_rows(groups)
    diffs = [
        100
        * (
            load_run(folder / f"trgl-k2-s{s}").summary["best_test_accuracy"]
            - load_run(folder / f"vangl-k2-s{s}").summary["best_test_accuracy"]
        )
        for s in (0, 1, 2)
    ]
    assert row["pairs"] == "3" and row["per seed"] == ", ".join(f"{d:+.2f}" for d in diffs)
    mean = sum(diffs) / 3
    sd = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
    t = 4.302652729749462  # t(0.975, 2 df), exact (a rounded table moved endpoints by 0.01)
    low, high = mean - t * sd / 3**0.5, mean + t * sd / 3**0.5
    assert row["95% interval"] == f"{low:+.2f} to {high:+.2f}"
    assert row["Bonferroni interval (m=1)"] == row["95% interval"]  # one comparison: nothing to adjust
    assert row["reading"] == ("noise (contains 0)" if low <= 0 <= high else "beyond noise")


def test_t_quantiles_are_exact_and_bonferroni_widens_them_for_a_tables_comparisons() -> None:
    from trgl_pipe.report import t_half_width, t_quantile

    # Student's t: 0.975 quantiles at 2 and 11 degrees of freedom; 1 - 0.05/32 at 2 (m = 16)
    assert abs(t_quantile(2) - 4.302652729749) < 1e-9 and abs(t_quantile(11) - 2.200985160082) < 1e-9
    assert abs(t_quantile(2, comparisons=16) - 17.846590219776) < 1e-6
    diffs = [-1.16, -0.86, -1.33]  # §5, K = 2: excludes 0 alone, not among 4 comparisons
    one, four = t_half_width(diffs), t_half_width(diffs, 4)
    mean = sum(diffs) / 3
    assert mean + one < 0 < mean + four and t_half_width([0.5]) is None


def test_the_authors_protocol_is_an_option_that_keeps_the_highest_test_accuracy(tmp_path: Path) -> None:
    # a committed run, with module 2 given a higher test accuracy at its first evaluation than any
    # module reaches at the last one: the authors' number takes it, trgl_pipe's does not
    run = tmp_path / "run"
    shutil.copytree(
        Path(__file__).resolve().parents[1] / "experiments" / "runs" / "authors" / "authors-s0", run
    )
    summary = json.loads((run / "summary.json").read_text())
    summary["modules"][2]["history"][0]["test_accuracy"] = 0.9012
    (run / "summary.json").write_text(json.dumps(summary))
    default = build_report([run], tmp_path / "plain", "x").read_text()
    assert "authors' protocol" not in default
    assert main([str(run), "--out", str(tmp_path / "authors"), "--protocol", "authors"]) == 0
    text = (tmp_path / "authors" / "report.md").read_text()
    assert "## The authors' protocol (chooses on the test set)" in text
    row = next(line for line in text.splitlines() if line.startswith("| Par TRGL") and "90.12" in line)
    assert row.rstrip(" |").split(" | ")[3:5] == ["90.12", "86.24"]  # theirs, then ours


def test_every_local_method_is_paired_with_its_vangl_twin_even_from_an_older_config(
    tiny, tmp_path: Path
) -> None:
    # VanGL, PredSim and DGL's MLP-SR head at seeds 0 and 1; the VanGL folders' config.yaml loses the
    # sections a run written before the objectives existed lacks: they still pair, by default values
    import yaml

    from trgl_pipe.report import paired_rows

    methods = {
        "vangl": ["trgl.enabled=false"],
        "predsim": ["objective.name=predsim"],
        "dgl": ["objective.name=vangl", "aux.type=dgl_mlp_sr"],
        "e2e": ["train.regime=e2e", "trgl.enabled=false"],
    }
    runs: dict[str, list] = {}
    for name, overrides in methods.items():
        for seed in (0, 1):
            cfg = tiny(*overrides, f"seed={seed}", "train.max_steps=3")
            run_single(cfg, console_summary=False)
            folder = Path(cfg.out_dir)
            if name == "vangl":
                config = yaml.safe_load((folder / "config.yaml").read_text())
                del config["objective"], config["aux"]["type"]
                (folder / "config.yaml").write_text(yaml.safe_dump(config))
            runs.setdefault(name, []).append(load_run(folder))
    groups = {name: group for name, group in runs.items()}
    rows = {row["comparison"]: row for row in paired_rows(groups)}
    assert set(rows) == {"Par PredSim K=2 n=300 − VanGL", "Par DGL (MLP-SR) K=2 n=300 − VanGL"}
    for name, label in (("predsim", "Par PredSim"), ("dgl", "Par DGL (MLP-SR)")):
        diffs = [
            100 * (a.summary["best_test_accuracy"] - b.summary["best_test_accuracy"])
            for a, b in zip(runs[name], runs["vangl"], strict=True)
        ]
        assert rows[f"{label} K=2 n=300 − VanGL"]["per seed"] == ", ".join(f"{d:+.2f}" for d in diffs)
    # a VanGL twin that differs in anything but the method (here: the learning rate) is no twin
    other = tiny("objective.name=predsim", "seed=0", "train.max_steps=3", "optim.lr=0.05")
    run_single(other, console_summary=False)
    assert paired_rows({"vangl": runs["vangl"], "x": [load_run(Path(other.out_dir))]}) == []
