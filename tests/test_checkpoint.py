"""Checkpoints: resume gives the uninterrupted result; bad checkpoints are refused with one line."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch
from conftest import final_stage_states

from trgl_pipe.errors import CheckpointError, NonFiniteLossError
from trgl_pipe.folder.checkpoint import latest_complete
from trgl_pipe.training.single import run_single


def _assert_same_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        for part in ("body", "head"):
            for name, tensor in a[k][part].items():
                assert torch.equal(tensor, b[k][part][name]), (k, part, name)
        assert a[k]["num_steps"] == b[k]["num_steps"]


@pytest.mark.parametrize(
    ("regime", "mid"),
    [
        (["checkpoint.every_steps=3"], "0000000003"),  # mid-epoch, parallel
        (
            ["train.regime=sequential", "trgl.tau_schedule=adaptive", "trgl.lambda_init=20000", "trgl.s=2"],
            "0000000005",
        ),
        (["train.regime=multilap", "train.epochs=2", "train.laps=2"], "0000000010"),
    ],
    ids=["parallel-mid-epoch", "sequential-adaptive", "multilap"],
)
def test_resumed_run_ends_like_an_uninterrupted_one(tiny, regime: list[str], mid: str) -> None:
    full = tiny("checkpoint.keep=100", *regime)
    summary_full = run_single(full, console_summary=False)
    source = Path(full.out_dir) / "checkpoints" / mid
    assert (source / "meta.json").is_file()
    resumed = tiny(*regime, f"resume={source}")
    summary_resumed = run_single(resumed, console_summary=False)
    _assert_same_states(final_stage_states(full.out_dir), final_stage_states(resumed.out_dir))
    for key in ("best_module", "best_val_accuracy", "best_test_accuracy"):
        assert summary_full[key] == summary_resumed[key]
    assert [m["history"] for m in summary_full["modules"]] == [
        m["history"] for m in summary_resumed["modules"]
    ]


def test_resume_auto_continues_in_place_and_keeps_n(tiny) -> None:
    cfg = tiny("checkpoint.every_steps=2", "checkpoint.keep=2")
    run_single(cfg, console_summary=False)
    folders = sorted(p.name for p in (Path(cfg.out_dir) / "checkpoints").iterdir())
    assert folders == ["0000000008", "0000000010"]
    again = tiny(f"out_dir={cfg.out_dir}", "resume=auto", "checkpoint.every_steps=2")
    summary = run_single(again, console_summary=False)  # resumes from the final checkpoint: nothing to do
    assert summary["best_test_accuracy"] is not None


def test_bad_checkpoints_are_refused(tiny, tmp_path: Path) -> None:
    cfg = tiny()
    run_single(cfg, console_summary=False)
    good = latest_complete(cfg.out_dir)

    incomplete = tmp_path / "incomplete"
    shutil.copytree(good, incomplete)
    (incomplete / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint there \(no meta.json\)"):
        run_single(tiny(f"resume={incomplete}"), console_summary=False)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    (corrupt / "module-1.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"module-1\.pt is corrupt"):
        run_single(tiny(f"resume={corrupt}"), console_summary=False)

    with pytest.raises(CheckpointError, match="it has 2 modules, the config 3"):
        run_single(tiny(f"resume={good}", "model.num_modules=3"), console_summary=False)
    with pytest.raises(CheckpointError, match="its model is"):
        run_single(tiny(f"resume={good}", "model.width=8"), console_summary=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny) -> None:
    # module 1's weights turn NaN before its 4th step; a checkpoint follows every step
    cfg = tiny(
        "debug.nan_at_step=4", "debug.raise_on_module=1", "checkpoint.every_steps=1", "log.every_steps=100"
    )
    with pytest.raises(
        NonFiniteLossError, match=r"module 1: the local loss became NaN or infinite at its step 4"
    ):
        run_single(cfg, console_summary=False)
    good = latest_complete(cfg.out_dir)
    assert good == Path(cfg.out_dir) / "checkpoints" / "0000000003"  # the last one before the NaN
    for k in (0, 1):
        state = torch.load(good / f"module-{k}.pt", weights_only=True)["stage"]
        assert all(torch.isfinite(t.float()).all() for part in ("body", "head") for t in state[part].values())


def test_disk_full_mid_write_keeps_the_previous_checkpoint(tiny, monkeypatch) -> None:
    import trgl_pipe.folder.checkpoint as ckpt

    cfg = tiny("checkpoint.every_steps=2", "checkpoint.keep=5")
    real = ckpt.atomic_write
    calls = {"n": 0}

    def flaky(path, write):
        calls["n"] += 1
        if calls["n"] == 5:  # the third checkpoint's first shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(ckpt, "atomic_write", flaky)
    with pytest.raises(CheckpointError, match=r"No space left on device.*earlier checkpoints are intact"):
        run_single(cfg, console_summary=False)
    root = Path(cfg.out_dir) / "checkpoints"
    assert latest_complete(cfg.out_dir) == root / "0000000004"
    assert not list(root.rglob("*.tmp"))


class _Worker:
    def __init__(self, index: int, value: float) -> None:
        self.index = index
        self.value = value

    def state_dict(self) -> dict:
        return {"w": torch.full((2,), self.value)}


def test_a_complete_checkpoint_is_replaced_only_by_a_complete_one(tiny, monkeypatch) -> None:
    # A run resumed from an earlier checkpoint reaches a counter that already holds a complete
    # checkpoint: the new one is written beside it and swapped in once complete.
    import trgl_pipe.folder.checkpoint as ckpt

    cfg = tiny("checkpoint.keep=5")
    writer = ckpt.CheckpointWriter(cfg, [(0, 3), (3, 6)], "parallel")
    progress = ckpt.Progress(counter=7, step=7)
    folder = writer.write(progress, [_Worker(0, 1.0), _Worker(1, 1.0)])
    assert (folder / "meta.json").is_file()

    real = ckpt.atomic_write_json

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "atomic_write_json", disk_full)  # the successor never completes
    with pytest.raises(CheckpointError):
        writer.write(progress, [_Worker(0, 2.0), _Worker(1, 2.0)])
    assert latest_complete(cfg.out_dir) == folder
    assert torch.equal(torch.load(folder / "module-0.pt", weights_only=True)["w"], torch.full((2,), 1.0))

    monkeypatch.setattr(ckpt, "atomic_write_json", real)
    assert writer.write(progress, [_Worker(0, 3.0), _Worker(1, 3.0)]) == folder
    assert latest_complete(cfg.out_dir) == folder
    for k in (0, 1):
        assert torch.equal(
            torch.load(folder / f"module-{k}.pt", weights_only=True)["w"], torch.full((2,), 3.0)
        )
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no .next or .old left


def test_a_resumed_run_records_the_global_generator_of_an_uninterrupted_one(tmp_path: Path) -> None:
    # torch seeds its global generator from the operating system in every process, and the
    # shards record it: a run that failed at step 7 and was resumed (two more processes) ended with
    # another generator state than the uninterrupted run. Seeded from `seed`, every process holds
    # the same, and the resumed run ends with the very shards of the uninterrupted one.
    from conftest import cli_args, run_cli

    common = ["train.epochs=2", "checkpoint.every_steps=3", "checkpoint.keep=100"]
    full = run_cli(cli_args(f"out_dir={tmp_path / 'full'}", *common))
    assert full.returncode == 0, full.stderr[-2000:]
    failed = run_cli(
        cli_args(f"out_dir={tmp_path / 'run'}", *common, "debug.raise_at_step=7", "debug.raise_on_module=1")
    )
    assert failed.returncode != 0
    again = run_cli(cli_args(f"out_dir={tmp_path / 'run'}", *common, "resume=auto"))
    assert again.returncode == 0, again.stderr[-2000:]
    for k in range(2):
        shard = Path("checkpoints") / "0000000010" / f"module-{k}.pt"
        a = torch.load(tmp_path / "full" / shard, weights_only=True)
        b = torch.load(tmp_path / "run" / shard, weights_only=True)
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]), k
        assert all(torch.equal(t, b["stage"]["body"][n]) for n, t in a["stage"]["body"].items())
