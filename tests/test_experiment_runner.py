"""experiments/run.py: finished runs are skipped, a folder another process is writing is left alone,
``--seeds`` picks seeds; and the lock probe it relies on."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trgl_pipe.config import load_config
from trgl_pipe.folder.run_folder import LOCK, claim, held_by

ROOT = Path(__file__).resolve().parents[1]


def _runner(root: Path):
    spec = importlib.util.spec_from_file_location("experiments_run_tool", ROOT / "experiments" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.ROOT, module.RUNS = root, root / "experiments" / "runs"
    return module


def test_held_by_names_the_holder_only_while_the_lock_is_held(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert held_by(out) is None  # no folder
    with claim(load_config(None, [f"out_dir={out}"])):
        assert held_by(out) == held_by(out)  # probing takes nothing away
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in held_by(out)
    assert held_by(out) is None
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    out.mkdir(exist_ok=True)
    (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout), "time": 0}))
    assert held_by(out) is None  # a lock file left by a crashed run holds nothing


def test_the_runner_skips_finished_and_running_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    runner = _runner(tmp_path)
    base = runner.RUNS / "competitors"
    for seed in (0, 1, 2):
        (base / f"dgl-mlp-sr-k16-s{seed}").mkdir(parents=True)
    (base / "dgl-mlp-sr-k16-s0" / "summary.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["run.py", "competitors", "--only", "dgl-mlp-sr-k16", "--dry-run"])
    with claim(load_config(None, [f"out_dir={base / 'dgl-mlp-sr-k16-s1'}"])):
        runner.main()
        lines = capsys.readouterr().out.splitlines()
        monkeypatch.setattr(sys, "argv", [*sys.argv[:-1], "--seeds", "2", "--dry-run"])
        runner.main()
        only_two = capsys.readouterr().out.splitlines()
    assert lines[0] == "done    experiments/runs/competitors/dgl-mlp-sr-k16-s0"
    assert lines[1].startswith("running experiments/runs/competitors/dgl-mlp-sr-k16-s1 (held by pid ")
    assert lines[1].endswith("): skipped")
    assert lines[2].startswith("run     ") and lines[2].endswith(
        "out_dir=experiments/runs/competitors/dgl-mlp-sr-k16-s2"
    )
    assert len(lines) == 3
    assert len(only_two) == 1 and only_two[0].endswith("dgl-mlp-sr-k16-s2")
