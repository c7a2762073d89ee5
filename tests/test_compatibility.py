"""The compatibility table of docs/compatibility.md is what trgl_pipe.compatibility decides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT

from trgl_pipe.config import load_config
from trgl_pipe.errors import ConfigError
from trgl_pipe.run import main


def _verdict(overrides: list[str]) -> str:
    try:
        load_config(None, overrides)
    except ConfigError as refused:
        assert "\n" not in str(refused)
        return "refused"
    return "runs"


def _table(first: str, keys: str) -> tuple[list[str], list[list[str]]]:
    """The columns after the first of docs/compatibility.md's table headed ``first``, and its rows
    whose first cell matches ``keys`` (a regex alternation), split into cells."""
    lines = (ROOT / "docs" / "compatibility.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith(f"| {first}"))
    cells = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in lines
        if re.match(rf"\| ({keys}) \|", line)
    ]
    return [c.strip() for c in header.strip("|").split("|")][1:], cells


def test_the_documented_table_is_the_functions() -> None:
    columns, rows = _table("train.regime", "e2e|parallel|sequential|multilap|ddg|fr")
    assert len(rows) == 6
    for regime, *cells in rows:
        extra = ["trgl.enabled=false"] if regime in ("ddg", "fr") else []
        for column, documented in zip(columns, cells, strict=True):
            setting = [column] if "=" in column else [f"objective.name={column}"]
            assert _verdict([f"train.regime={regime}", *extra, *setting]) == documented, (regime, column)


def test_the_documented_network_table_is_the_functions() -> None:
    columns, rows = _table("model.arch", "cifar_resnet|resnet18|vgg11_bn|swin_t")
    assert len(rows) == 4
    for arch, *cells in rows:
        for column, documented in zip(columns, cells, strict=True):
            layout = ["model.num_modules=4"] if column.startswith("pipeline.") else []
            assert _verdict([f"model.arch={arch}", column, *layout]) == documented, (arch, column)


def test_a_local_objective_with_a_delayed_regime_is_one_line_from_the_cli(tmp_path: Path, capsys) -> None:
    # it used to start and end in "TypeError: 'InfoProObjective' object is not callable"
    out = tmp_path / "run"
    code = main(["train.regime=ddg", "trgl.enabled=false", "objective.name=infopro", f"out_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        "error: objective.name=infopro does not train in train.regime=ddg (it supports e2e, parallel, "
        "sequential, multilap): the delayed-gradient regimes train the end-to-end loss; use "
        "objective.name=vangl with trgl.enabled=false, or another regime"
    ]
    assert not out.exists()


def test_keys_the_run_never_reads_get_one_warning_line_naming_them(tmp_path: Path, capsys) -> None:
    import warnings

    from trgl_pipe.config import load_config
    from trgl_pipe.errors import UnusedKeyWarning

    with pytest.warns(UnusedKeyWarning) as caught:
        load_config(None, ["objective.name=predsim", "trgl.tau=5", "trgl.s=10", "trgl.reduction=mean"])
    assert [str(w.message) for w in caught] == [
        "set but not used: trgl.s (objective.name=predsim does not read the trgl section); "
        "trgl.tau (objective.name=predsim does not read the trgl section)"
    ]  # trgl.reduction is read: the module bodies reduce C_k with it whatever the objective
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what the run reads, and the committed configs, warn nothing
        load_config(None, ["trgl.tau=5", "trgl.enabled=false"])
        # a config.yaml a run wrote holds every key at its value: the defaults are not "set"
        load_config(None, ["objective.name=infopro", "trgl.tau=100000.0", "train.delays=paper"])
        for path in sorted((ROOT / "configs").rglob("*.yaml")):
            load_config(path)
    out = tmp_path / "run"
    with pytest.warns(UnusedKeyWarning, match=r"^set but not used: trgl\.tau \(objective\.name=infopro"):
        assert main(["objective.name=infopro", "trgl.tau=5", f"out_dir={out}", "--print-config"]) == 0
    # the command line shows it as one line (pytest records warnings instead of printing them)
    assert warnings.formatwarning("x", UnusedKeyWarning, "f.py", 1) == "UnusedKeyWarning: x\n"


def test_print_config_refuses_what_the_run_would_refuse_for_its_number_of_modules(
    tmp_path: Path, capsys
) -> None:
    # InfoPro's authors give loss weights for K in {2, 4, 8, 16} only: --print-config said nothing
    # of K=3 and the run then stopped at its first module's build
    from trgl_pipe.run import main

    out = tmp_path / "run"
    assert main(["objective.name=infopro", "model.num_modules=3", f"out_dir={out}", "--print-config"]) == 2
    assert "the authors give weights for K in [2, 4, 8, 16] only, not K=3" in capsys.readouterr().err
    given = ["objective.name=infopro", "model.num_modules=3", "objective.kwargs={weights: [1, 0.5, 0, 1]}"]
    assert main([*given, f"out_dir={out}", "--print-config"]) == 0
    assert not out.exists()
