"""Bad input: exit non-zero with one line, no traceback, earlier outputs intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, cli_args, run_cli, run_here, snapshot

from trgl_pipe.folder.checkpoint import latest_complete


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["train.epochz=3"], ["unknown config key 'train.epochz'"]),
        (["data.batch_size=big"], ["data.batch_size must be an integer"]),
        (["model.num_modules=7"], ["model.num_modules=7 is larger than the 6 residual blocks"]),
        (["data.name=cifar10", "data.source=auto"], ["data.name=cifar10 needs data.root"]),
        (
            ["data.name=stl10", "data.source=root", "data.root=/nonexistent"],
            ["data.root=/nonexistent is not a folder"],
        ),
    ],
)
def test_user_errors(tmp_path: Path, args: list[str], fragments: list[str], capsys) -> None:
    result = run_here(cli_args(f"out_dir={tmp_path / 'out'}", *args), capsys)
    _one_line_error(result, *fragments)
    assert result.returncode == 2


def test_missing_config_file(tmp_path: Path, capsys) -> None:
    _one_line_error(run_here([str(tmp_path / "nope.yaml")], capsys), "cannot read config file")


def test_malformed_dataset_files(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data" / "FashionMNIST" / "raw"
    root.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (root / name).write_bytes(b"garbage!")
    result = run_here(
        cli_args(f"out_dir={tmp_path / 'out'}", "data.source=root", f"data.root={tmp_path / 'data'}"), capsys
    )
    _one_line_error(result, "bad IDX header", "train-images-idx3-ubyte")


def test_unwritable_out_dir(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(run_here(cli_args(f"out_dir={blocker}"), capsys), "exists and is not a folder")
    _one_line_error(run_here(cli_args(f"out_dir={blocker}/sub"), capsys), "cannot be written")


def test_a_finished_run_is_neither_overwritten_nor_rewritten_by_resume(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    first = run_here(cli_args(f"out_dir={out}", "train.epochs=1"), capsys)
    assert first.returncode == 0, first.stderr
    before = snapshot(out)
    _one_line_error(
        run_here(cli_args(f"out_dir={out}"), capsys), "already holds a run", "resume=auto", "overwrite=true"
    )
    assert snapshot(out) == before
    # resume=auto on a finished run: one line, exit 0, every byte as it was (it used to rewrite
    # summary.json with a wall time of 0 and append to metrics.jsonl)
    again = run_here(cli_args(f"out_dir={out}", "train.epochs=1", "resume=auto"), capsys)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines() == [
        f"resume=auto: out_dir={out} holds a finished run (final checkpoint at step 5); nothing to do"
    ]
    assert snapshot(out) == before
    # another setting that trains no further would rewrite its record (config.yaml said lr 0.05
    # although no step trained with it): one line, exit 2, every byte as it was
    _one_line_error(
        run_here(cli_args(f"out_dir={out}", "train.epochs=1", "resume=auto", "optim.lr=0.05"), capsys),
        "holds a finished run (final checkpoint at step 5); optim.lr=0.05 (it ran with 0.1) would change",
        "raise train.epochs",
    )
    assert snapshot(out) == before


def test_sigterm_writes_a_checkpoint_and_resume_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        *TINY,
        f"out_dir={out}",
        "train.epochs=30",
        "data.train_size=1000",
        "checkpoint.every_epochs=0",
        "log.every_steps=1",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "trgl_pipe.run", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and '"train"' in metrics.read_text()):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    folder = latest_complete(out)
    assert folder is not None
    meta = json.loads((folder / "meta.json").read_text())
    assert not meta["progress"]["final"] and meta["progress"]["step"] >= 1
    assert not (out / "summary.json").exists()
    done = run_cli([*args, "resume=auto", "train.epochs=2"])  # finish quickly
    assert done.returncode == 0, done.stderr
    assert f"resumed from {folder}" in done.stdout
    assert (out / "summary.json").exists()
