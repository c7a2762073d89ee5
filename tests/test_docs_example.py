"""The complete example of docs/your-own-network.md runs as written (its files, its command)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "your-own-network.md"


def example_files(doc: Path = DOC) -> dict[str, str]:
    """Every fenced block whose first line is ``# <file name>``, by file name."""
    files = {}
    for body in re.findall(r"```(?:python|yaml)\n(.*?)```", doc.read_text(), flags=re.S):
        first = body.splitlines()[0]
        if re.fullmatch(r"# [\w.]+\.(py|yaml)", first):
            files[first[2:]] = body
    return files


def test_the_example_of_the_docs_trains_as_written(tmp_path: Path) -> None:
    files = example_files()
    assert sorted(files) == ["my_data.py", "my_nets.py", "my_run.yaml", "my_script.py"]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # the documented command; a few steps only, so that CI stays fast
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trgl_pipe.run",
            "my_run.yaml",
            "train.max_steps=2",
            "train.num_threads=1",
            "log.live=off",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "1500 train / 500 val / 1000 test images of 3x16x16, 4 classes, from my_data:build" in result.stdout
    )
    summary = json.loads((tmp_path / "runs" / "my_run" / "summary.json").read_text())
    assert [m["blocks"] for m in summary["modules"]] == [[0, 1], [1, 2], [2, 4], [4, 6]]
    assert all(m["kinetic_energy"] > 0 for m in summary["modules"])  # Residual blocks: exact cost
    assert result.stderr.strip() == ""  # Residual blocks: no warning about blocks without a cost


def test_the_objective_example_of_the_docs_trains_as_written(tmp_path: Path) -> None:
    files = example_files(ROOT / "docs" / "your-own-objective.md")
    assert sorted(files) == ["my_objective_run.yaml", "my_objectives.py"]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    result = subprocess.run(
        [sys.executable, "-m", "trgl_pipe.run", "my_objective_run.yaml", "train.max_steps=3", "log.live=off"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "distill" / "summary.json").read_text())
    assert [m["method"] for m in summary["modules"]] == ["distill(weight=0.5)"] * 2
    import torch

    folder = sorted((tmp_path / "runs" / "distill" / "checkpoints").iterdir())[-1]
    shard = torch.load(folder / "module-0.pt", weights_only=True)["stage"]
    assert shard["objective"]["centres"].shape == (10, 6) and "projection.weight" in "".join(shard["aux"])
