"""Every bad input of every command: its exit code, one line naming the key or file, no traceback,
and the files it was pointed at unchanged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, snapshot

from trgl_pipe import evaluate, export, plan, report, run
from trgl_pipe.config import load_config
from trgl_pipe.folder.checkpoint import latest_complete
from trgl_pipe.training.single import run_single


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A finished run, its export, and a narrower run (for a shard of another width)."""
    root = tmp_path_factory.mktemp("made")
    run_single(load_config(None, [*TINY, f"out_dir={root / 'run'}"]), console_summary=False)
    run_single(
        load_config(None, [*TINY, f"out_dir={root / 'narrow'}", "model.width=2", "train.epochs=1"]),
        console_summary=False,
    )
    export.export(root / "run")
    return {"run": root / "run", "narrow": root / "narrow"}


def _copy_run(made: dict[str, Path], tmp: Path) -> Path:
    out = tmp / "run"
    shutil.copytree(made["run"], out)
    return out


def _each_meta(out: Path, change: Callable[[dict], object]) -> None:
    for path in (out / "checkpoints").glob("*/meta.json"):
        path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _drop(meta: dict, key: str) -> dict:
    del meta[key]
    return meta


def _image_folder(tmp: Path) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for name in ("cat", "dog"):
            folder = tmp / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(3 if (split, name) != ("train", "dog") else 0):  # no training dog
                Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(folder / f"{i}.png")
    return tmp / "images"


# (command, arguments from (made, tmp), exit code, fragment of the line); "{out}" is a copy of the run
def _resume(*overrides: str) -> Callable:
    return lambda made, tmp: [*TINY, f"out_dir={_copy_run(made, tmp)}", "resume=auto", *overrides]


def _shard_of_another_width(made, tmp):
    out = _copy_run(made, tmp)
    shutil.copy(latest_complete(made["narrow"]) / "module-0.pt", latest_complete(out) / "module-0.pt")
    return [*TINY, f"out_dir={out}", "resume=auto", "train.epochs=3"]


def _meta_list(made, tmp):
    out = _copy_run(made, tmp)
    _each_meta(out, lambda meta: [meta])
    return [*TINY, f"out_dir={out}", "resume=auto", "train.epochs=3"]


def _meta_without_progress(made, tmp):
    out = _copy_run(made, tmp)
    _each_meta(out, lambda meta: _drop(meta, "progress"))
    return [*TINY, f"out_dir={out}", "resume=auto", "train.epochs=3"]


def _latin1_yaml(made, tmp):
    path = tmp / "latin1.yaml"
    path.write_bytes("# réglages\ntrain:\n  epochs: 2\n".encode("latin-1"))
    return [str(path), f"out_dir={tmp / 'out'}"]


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _fresh(*overrides: str) -> Callable:
    return lambda made, tmp: [*TINY, f"out_dir={tmp / 'out'}", *overrides]


def _empty_class_folder(made, tmp):
    root = _image_folder(tmp)
    return [
        *TINY,
        f"out_dir={tmp / 'out'}",
        "data.name=image_folder",
        "data.source=root",
        f"data.root={root}",
        "data.val_size=2",
        "data.train_size=null",
        "data.test_size=null",
    ]


def _export_to_a_file(made, tmp):
    out = _copy_run(made, tmp)
    (tmp / "file").write_text("x")
    return [str(out), "--to", str(tmp / "file")]


def _export_folder(made, tmp) -> Path:
    out = _copy_run(made, tmp)
    return out / "export"


def _evaluate_garbage_info(made, tmp):
    folder = _export_folder(made, tmp)
    (folder / "export.json").write_text("{not json")
    return [str(folder)]


def _evaluate_info_list(made, tmp):
    folder = _export_folder(made, tmp)
    (folder / "export.json").write_text("[1, 2]")
    return [str(folder)]


def _evaluate_missing_pt2(made, tmp):
    folder = _export_folder(made, tmp)
    info = json.loads((folder / "export.json").read_text())
    info["model_pt2"] = str(folder / "model.pt2")
    (folder / "export.json").write_text(json.dumps(info))
    (folder / "model.pt2").unlink(missing_ok=True)
    return [str(folder), "--program"]


def _evaluate_garbage_pt2(made, tmp):
    folder = _export_folder(made, tmp)
    info = json.loads((folder / "export.json").read_text())
    info["model_pt2"] = str(folder / "model.pt2")
    (folder / "export.json").write_text(json.dumps(info))
    (folder / "model.pt2").write_bytes(b"garbage")
    return [str(folder), "--program"]


def _evaluate_garbage_pt(made, tmp):
    folder = _export_folder(made, tmp)
    (folder / "model.pt").write_bytes(b"garbage")
    return [str(folder)]


def _evaluate_other_shape(made, tmp):
    folder = _export_folder(made, tmp)
    return [
        str(folder),
        "data.name=synthetic",
        "data.source=auto",
        "data.image_size=16",
        "data.channels=3",
        "data.train_size=64",
        "data.val_size=16",
        "data.test_size=32",
    ]


def _report_summary_list(made, tmp):
    out = _copy_run(made, tmp)
    (out / "summary.json").write_text("[1, 2, 3]")
    return [str(out), "--out", str(tmp / "report")]


def _report_out_a_file(made, tmp):
    out = _copy_run(made, tmp)
    (tmp / "file").write_text("x")
    return [str(out), "--out", str(tmp / "file")]


def _plan(*args: str) -> Callable:
    return lambda made, tmp: [str(ROOT / "configs" / "quickstart.yaml"), *args]


CASES = {
    # checkpoint contents
    "shard of another width": (run, _shard_of_another_width, 2, "does not fit module 0"),
    "meta.json holds a list": (run, _meta_list, 2, "meta.json holds a list, not an object"),
    "meta.json lacks keys": (run, _meta_without_progress, 2, "meta.json lacks progress"),
    "resume with another width": (run, _resume("model.width=8"), 2, "its model is"),
    # config
    "non-UTF-8 config file": (run, _latin1_yaml, 2, "is not UTF-8 text"),
    "seed beyond 64 bits": (
        run,
        _fresh("seed=99999999999999999999999"),
        2,
        "seed=99999999999999999999999 is too",
    ),
    "timeout of 1e300 s": (
        run,
        _fresh("pipeline.timeout_s=1e300"),
        2,
        "pipeline.timeout_s=1e+300 is beyond a week",
    ),
    "batch size 1e20": (run, _fresh("data.batch_size=1e20"), 2, "data.batch_size must be an integer"),
    "batch size 10**20": (run, _fresh("data.batch_size=100000000000000000000"), 2, "data.batch_size=1"),
    "infinite tau": (run, _fresh("trgl.tau=.inf"), 2, "trgl.tau must be a finite number"),
    "fault on no module": (
        run,
        _fresh("debug.raise_at_step=1", "debug.raise_on_module=7"),
        2,
        "debug.raise_on_module=7 names no module",
    ),
    "replicas in the sequential regime": (
        run,
        _fresh("train.regime=sequential", "pipeline.replicas=2"),
        2,
        "pipeline.replicas=2 applies to the pipeline",
    ),
    "empty class folder": (run, _empty_class_folder, 2, "holds no images"),
    "out_dir name too long": (
        run,
        lambda made, tmp: [*TINY, f"out_dir={tmp / ('x' * 300)}", "resume=auto"],
        2,
        "cannot be written (File name too long); choose a writable out_dir",
    ),
    "key twice in a YAML file": (
        run,
        lambda made, tmp: [
            _write(tmp / "twice.yaml", "train:\n  epochs: 1\n  epochs: 2\n"),
            f"out_dir={tmp}/o",
        ],
        2,
        "gives key 'epochs' twice in one section (line 3)",
    ),
    # deliberate faults say one line, as in the pipeline
    "raise_at_step in one process": (
        run,
        _fresh("debug.raise_at_step=2"),
        1,
        "debug.raise_at_step=2 reached",
    ),
    "raise_at_step in the simulation": (
        run,
        _fresh("debug.raise_at_step=2", "pipeline.transport=sim"),
        1,
        "debug.raise_at_step=2 reached",
    ),
    # export, evaluate, report, plan
    "export --to a file": (export, _export_to_a_file, 2, "is a file; name a folder"),
    "export.json garbage": (evaluate, _evaluate_garbage_info, 2, "export.json is unreadable"),
    "export.json a list": (evaluate, _evaluate_info_list, 2, "export.json lacks module"),
    "model.pt2 missing": (evaluate, _evaluate_missing_pt2, 2, "model.pt2 is missing"),
    "model.pt2 garbage": (
        evaluate,
        _evaluate_garbage_pt2,
        2,
        "model.pt2 is not a readable torch.export program",
    ),
    "model.pt garbage": (evaluate, _evaluate_garbage_pt, 2, "not a readable exported model"),
    "data of another shape": (evaluate, _evaluate_other_shape, 2, "evaluate it on data like that"),
    "summary.json a list": (report, _report_summary_list, 2, "summary.json holds a list"),
    "report --out a file": (report, _report_out_a_file, 2, "--out"),
    "plan --gpus 0": (plan, _plan("--gpus", "0"), 2, "--gpus 0 is invalid"),
    "plan --gpus -2": (plan, _plan("--gpus", "-2"), 2, "--gpus -2 is invalid"),
    "plan --gpu-memory -5": (
        plan,
        _plan("--gpus", "4", "--gpu-memory", "-5"),
        2,
        "--gpu-memory -5 is invalid",
    ),
}
if not torch.cuda.is_available():
    CASES["plan --device cuda without a GPU"] = (
        plan,
        _plan("--gpus", "2", "--device", "cuda"),
        2,
        "no CUDA GPU",
    )

WRITES = {"raise_at_step in one process", "raise_at_step in the simulation"}  # they fail while training


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_line(case: str, made, tmp_path: Path, capsys) -> None:
    command, make_args, code, fragment = CASES[case]
    args = make_args(made, tmp_path)
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert command.main(args) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    if case not in WRITES:
        assert snapshot(tmp_path) == before
        assert not (tmp_path / "out").exists()


def test_torchrun_script_with_a_bad_key_says_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "launch/torchrun.sh", "configs/quickstart.yaml", "train.epochz=1", f"out_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key 'train.epochz'"), result.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_plan_takes_overrides_after_its_options(capsys) -> None:
    args = [str(ROOT / "configs" / "quickstart.yaml"), "--gpus", "2", "--device", "cpu", *TINY]
    assert plan.main(args) == 0
    assert "torchrun --nproc_per_node=2" in capsys.readouterr().out


def test_a_report_skips_garbage_metric_lines(made, tmp_path: Path) -> None:
    out = _copy_run(made, tmp_path)
    with open(out / "metrics.jsonl", "ab") as handle:
        handle.write(b'\x00\xff garbage\n[1]\n{"event": "train", "module": "x"}\n{"event": "tra')
    assert report.main([str(out), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.md").is_file()
