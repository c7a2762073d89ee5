"""An exported module classifies exactly as it did in training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from trgl_pipe.errors import UserError
from trgl_pipe.evaluate import evaluate
from trgl_pipe.export import export, load_exported
from trgl_pipe.training.single import run_single


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    from conftest import TINY

    from trgl_pipe.config import load_config

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [*TINY, f"out_dir={out}", "model.num_modules=3", "train.epochs=3"])
    return out, run_single(cfg, console_summary=False)


def test_exported_best_module_has_the_reported_accuracy(trained) -> None:
    out, summary = trained
    info = export(out)
    assert info["module"] == summary["best_module"]
    for program in (False, True):
        result = evaluate(out / "export", "test", program=program)
        assert result["accuracy"] == summary["best_test_accuracy"]
    assert evaluate(out / "export", "val")["accuracy"] == summary["best_val_accuracy"]


@pytest.mark.parametrize("module", [0, 2])
def test_every_module_can_be_exported(trained, tmp_path: Path, module: int) -> None:
    out, summary = trained
    export(out, module=module, to=tmp_path / "e")
    model = load_exported(tmp_path / "e" / "model.pt")
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert evaluate(tmp_path / "e")["accuracy"] == summary["modules"][module]["test_accuracy"]
    program = torch.export.load(tmp_path / "e" / "model.pt2").module()
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(program(x), model(x))


def test_export_errors_are_one_line(trained, tmp_path: Path) -> None:
    out, _ = trained
    with pytest.raises(UserError, match=r"--module 7 is out of range: this run has modules 0\.\.2"):
        export(out, module=7, to=tmp_path / "x")
    result = subprocess.run(
        [sys.executable, "-m", "trgl_pipe.export", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert (
        result.returncode == 2
        and result.stderr.startswith("error: ")
        and "no complete checkpoint" in result.stderr
    )
    export(
        out, to=tmp_path / "export"
    )  # its own: under pytest-xdist another worker may hold the first test's
    result = subprocess.run(
        [sys.executable, "-m", "trgl_pipe.evaluate", str(tmp_path / "export")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0 and json.loads(result.stdout)["split"] == "test"
