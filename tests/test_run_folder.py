"""A run folder is never lost or mixed up: checks before writes, a lock, overwrite keeps the old run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_args, run_cli, run_here, snapshot

from trgl_pipe.config import load_config
from trgl_pipe.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, OutputError
from trgl_pipe.folder.checkpoint import latest_complete
from trgl_pipe.folder.run_folder import LOCK, REPLACED, claim
from trgl_pipe.training.single import run_single
from trgl_pipe.watch.metrics import MetricsLogger, read_metrics


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run (checkpoints after each epoch), copied by each test that changes it."""
    from conftest import TINY

    out = tmp_path_factory.mktemp("finished") / "run"
    run_single(load_config(None, [*TINY, f"out_dir={out}"]), console_summary=False)
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _config(out: Path, *overrides: str):
    from conftest import TINY

    return load_config(None, [*TINY, f"out_dir={out}", *overrides])


def _damage_meta(out: Path, text: str) -> None:
    for meta in (out / "checkpoints").glob("*/meta.json"):
        meta.write_text(text)


def _drop_key(key: str):
    def damage(out: Path) -> None:
        for meta in (out / "checkpoints").glob("*/meta.json"):
            data = json.loads(meta.read_text())
            del data[key]
            meta.write_text(json.dumps(data))

    return damage


@pytest.mark.parametrize(
    ("overrides", "damage", "error", "fragment"),
    [
        (["model.width=8"], None, CheckpointError, "its model is"),
        (["model.num_modules=3"], None, CheckpointError, "it has 2 modules, the config 3"),
        (["data.batch_size=32"], None, CheckpointError, "batches per epoch"),
        ([], lambda out: _damage_meta(out, "[1, 2]"), CheckpointError, "holds a list, not an object"),
        ([], lambda out: _damage_meta(out, "{broken"), CheckpointError, "unreadable"),
        ([], _drop_key("progress"), CheckpointError, "lacks progress"),
        ([], _drop_key("arch"), CheckpointError, "lacks arch"),
    ],
)
def test_a_refused_resume_writes_nothing(finished, tmp_path, overrides, damage, error, fragment) -> None:
    out = _copy(finished, tmp_path)
    if damage is not None:
        damage(out)
    before = snapshot(out)
    with pytest.raises(error, match=fragment):
        run_single(_config(out, "resume=auto", "train.epochs=3", *overrides), console_summary=False)
    assert snapshot(out) == before  # config.yaml not rewritten, no "start" appended, no lock left


def test_a_shard_of_another_width_is_refused_before_writing(finished, tmp_path) -> None:
    out = _copy(finished, tmp_path)
    other = tmp_path / "narrow"
    run_single(_config(other, "model.width=2", "train.epochs=1"), console_summary=False)
    folder = latest_complete(out)
    shutil.copy(latest_complete(other) / "module-1.pt", folder / "module-1.pt")  # meta still says width 4
    before = snapshot(out)
    with pytest.raises(CheckpointError, match=r"module-1\.pt does not fit module 1 of this config"):
        run_single(_config(out, "resume=auto", "train.epochs=3"), console_summary=False)
    assert snapshot(out) == before


def test_a_refused_resume_on_the_command_line(finished, tmp_path, capsys) -> None:
    out = _copy(finished, tmp_path)
    before = snapshot(out)
    result = run_here(cli_args(f"out_dir={out}", "resume=auto", "model.width=8"), capsys)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "its model is" in result.stderr, result.stderr
    assert snapshot(out) == before


def test_overwrite_keeps_the_earlier_run_when_the_new_one_is_refused(finished, tmp_path) -> None:
    out = _copy(finished, tmp_path)
    before = snapshot(out)
    with pytest.raises(DataError, match=r"data\.root=/nonexistent is not a folder"):
        run_single(
            _config(out, "overwrite=true", "data.name=stl10", "data.source=root", "data.root=/nonexistent"),
            console_summary=False,
        )
    assert snapshot(out) == before


def test_overwrite_moves_the_earlier_run_aside_until_the_new_one_checkpoints(finished, tmp_path) -> None:
    out = _copy(finished, tmp_path)
    before = snapshot(out)
    # the replacement fails before its first checkpoint: the earlier run is still there, aside
    failing = _config(out, "overwrite=true", "debug.nan_at_step=2", "checkpoint.every_epochs=0")
    with pytest.raises(NonFiniteLossError):
        run_single(failing, console_summary=False)
    assert snapshot(out / REPLACED) == before
    # a replacement that completes removes it
    summary = run_single(_config(out, "overwrite=true", "train.epochs=1"), console_summary=False)
    assert not (out / REPLACED).exists()
    assert json.loads((out / "summary.json").read_text())["epochs"] == summary["epochs"] == 1
    assert not (out / LOCK).exists()


def test_a_second_run_on_a_held_folder_gets_one_line_naming_the_holder(finished, tmp_path) -> None:
    out = _copy(finished, tmp_path)
    with claim(_config(out, "resume=auto")):
        before = snapshot(out)
        result = run_cli(cli_args(f"out_dir={out}", "resume=auto", "train.epochs=3"))
        assert snapshot(out) == before
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"is in use by pid {os.getpid()} on host {socket.gethostname()}" in lines[0]
    assert not (out / LOCK).exists()  # released by its holder


def test_a_stale_lock_of_a_crashed_run_is_taken_over(finished, tmp_path, capsys) -> None:
    out = _copy(finished, tmp_path)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(gone.stdout)
    (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid, "time": 0}))
    result = run_here(cli_args(f"out_dir={out}", "resume=auto", "train.epochs=3"), capsys)
    assert result.returncode == 0, result.stderr
    assert f"taking over the lock left by pid {dead_pid}" in result.stdout
    assert not (out / LOCK).exists()


def test_resume_auto_without_a_complete_checkpoint_refuses_a_folder_holding_a_run(finished, tmp_path) -> None:
    out = _copy(finished, tmp_path)
    for meta in (out / "checkpoints").glob("*/meta.json"):
        meta.unlink()
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"holds a run .* but no complete checkpoint.*overwrite=true"):
        run_single(_config(out, "resume=auto"), console_summary=False)
    assert snapshot(out) == before
    run_single(_config(out, "overwrite=true", "train.epochs=1"), console_summary=False)
    assert latest_complete(out) is not None


def test_resume_auto_on_an_empty_folder_starts(tmp_path) -> None:
    run_single(_config(tmp_path / "new", "resume=auto", "train.epochs=1"), console_summary=False)
    assert (tmp_path / "new" / "summary.json").is_file()


def test_a_refused_run_removes_the_folder_it_created(tmp_path) -> None:
    out = tmp_path / "new"
    with pytest.raises(DataError):
        run_single(_config(out, "data.name=stl10", "data.source=root", "data.root=/nonexistent"))
    assert not out.exists()


def _full_disk_after(calls: int):
    """An ``os.write`` that writes half its bytes at call ``calls`` and then finds the disk full."""
    real = os.write
    count = {"n": 0}

    def write(fd: int, data) -> int:
        count["n"] += 1
        if count["n"] == calls:
            real(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    return write


def test_a_full_disk_leaves_whole_metric_lines_and_one_error_line(tmp_path, monkeypatch) -> None:
    path = tmp_path / "metrics.jsonl"
    logger = MetricsLogger(path)
    logger.log("first", value=1)
    monkeypatch.setattr(os, "write", _full_disk_after(1))
    with pytest.raises(OutputError, match=r"cannot write .*metrics\.jsonl \(No space left on device\)"):
        logger.log("second", value=2)
    monkeypatch.undo()
    logger.close()
    assert path.read_text().endswith("\n")
    assert [e["event"] for e in read_metrics(path)] == ["first"]


def test_readers_skip_a_torn_or_foreign_line(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "a"}\n[1, 2]\n7\n{"event": "b"}\n{"event": "c", "ti')
    assert [e["event"] for e in read_metrics(path)] == ["a", "b"]


def test_a_full_disk_with_checkpoints_off_ends_in_one_line(tmp_path) -> None:
    out = tmp_path / "run"
    code = (
        "import errno, os, sys\n"
        "real = os.write\n"
        "count = [0]\n"
        "def write(fd, data):\n"
        "    count[0] += 1\n"
        "    if count[0] == 6:\n"
        "        real(fd, bytes(data[: len(data) // 2]))\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return real(fd, data)\n"
        "os.write = write\n"
        "from trgl_pipe.run import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = cli_args(f"out_dir={out}", "checkpoint.every_epochs=0", "train.epochs=1")
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "No space left on device" in result.stderr, result.stderr
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    assert all(isinstance(json.loads(line), dict) for line in text.splitlines())
    assert not (out / LOCK).exists()


def test_a_torchrun_restart_before_the_first_checkpoint_starts_again(tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")  # the attempt that died before checkpointing
    (out / "metrics.jsonl").write_text('{"event": "start"}\n')
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        claim(_config(out, "resume=auto"))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with claim(_config(out, "resume=auto")) as folder:
        assert folder.out == out
    (out / "summary.json").write_text("{}")  # a finished run is never started over
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        claim(_config(out, "resume=auto"))


@pytest.mark.parametrize(
    ("module", "name"), [("trgl_pipe.watch.summary", "summary.json"), ("trgl_pipe.io", "config.yaml")]
)
def test_a_full_disk_writing_summary_or_config_is_one_line(tmp_path, monkeypatch, module, name) -> None:
    import importlib

    target = importlib.import_module(module)
    attribute = "atomic_write_json" if name == "summary.json" else "atomic_write_text"

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(target, attribute, full)
    with pytest.raises(OutputError, match=rf"cannot write .*{name} \(No space left on device\)"):
        run_single(
            _config(tmp_path / "run", "train.epochs=1", "checkpoint.every_epochs=0"), console_summary=False
        )
    assert not (tmp_path / "run" / LOCK).exists()
