"""TensorBoard (and W&B) series: what the event files hold equals what metrics.jsonl holds."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from trgl_pipe.training.single import run_single
from trgl_pipe.watch.metrics import read_metrics
from trgl_pipe.watch.series import SeriesBuilder, rank_points

pytest.importorskip("tensorboard")


def read_tensorboard(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar series of the event files under ``log_dir``: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def expected_series(events: list[dict]) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for e in events:
        m = e.get("module")
        if e["event"] == "train":
            for name, tag in (("loss", "loss"), ("ce", "ce"), ("kinetic", "kinetic"), ("lr", "lr")):
                series.setdefault(f"module_{m}/{tag}", {})[e["step"]] = e[name]
            series.setdefault(f"module_{m}/train_accuracy", {})[e["step"]] = e["accuracy"]
            if e.get("tau") is not None:
                series.setdefault(f"module_{m}/tau", {})[e["step"]] = e["tau"]
        elif e["event"] == "eval":
            series.setdefault(f"module_{m}/{e['split']}_accuracy", {})[e["step"]] = e["accuracy"]
    return series


def assert_same(found: dict[str, dict[int, float]], events: list[dict]) -> None:
    expected = expected_series(events)
    assert len(expected) >= 8
    for tag, points in expected.items():
        assert tag in found, tag
        assert sorted(found[tag]) == sorted(points), tag
        for step, value in points.items():
            assert math.isclose(found[tag][step], value, rel_tol=1e-6, abs_tol=1e-6), (tag, step)


def test_tensorboard_event_files_hold_the_metrics_of_a_one_process_run(tiny) -> None:
    cfg = tiny("log.tensorboard=true", "train.epochs=2")
    summary = run_single(cfg, console_summary=False)
    out = Path(cfg.out_dir)
    events = read_metrics(out / "metrics.jsonl")
    found = read_tensorboard(out / "tensorboard")
    assert_same(found, events)
    # every training step of every module is a point (log.every_steps=1 in the tiny config)
    steps = summary["modules"][0]["num_steps"]
    assert sorted(found["module_0/loss"]) == list(range(1, steps + 1))
    # the per-process figures, at the end of training, keyed by module 0's step
    assert found["rank_0/samples_per_s"][steps] == pytest.approx(
        summary["ranks"][0]["train_samples"] / summary["ranks"][0]["elapsed_s"], rel=1e-5
    )
    assert 0 < found["rank_0/compute_fraction"][steps] <= 1
    hparams = read_tensorboard(out / "tensorboard" / ".")
    assert hparams["hparam/best_test_accuracy"][0] == pytest.approx(summary["best_test_accuracy"])


def test_no_tensorboard_folder_unless_asked(tiny) -> None:
    cfg = tiny("train.max_steps=2", "train.epochs=1")
    run_single(cfg, console_summary=False)
    assert not (Path(cfg.out_dir) / "tensorboard").exists()


def test_series_are_keyed_by_the_module_step_and_skip_other_replicas() -> None:
    builder = SeriesBuilder()
    train = {
        "event": "train",
        "module": 2,
        "step": 50,
        "loss": 1.5,
        "ce": 1.0,
        "kinetic": 3.0,
        "accuracy": 0.5,
        "lr": 0.1,
        "tau": None,
        "lambda": 2e5,
    }
    points = builder.from_event(train)
    assert {(p.tag, p.step) for p in points} >= {("module_2/loss", 50), ("module_2/lambda", 50)}
    assert not any(p.tag.endswith("/tau") for p in points)
    # an event written before eval events carried a step: the module's latest step
    old_eval = {"event": "eval", "module": 2, "split": "val", "accuracy": 0.7, "ce": 0.9}
    assert next((p.tag, p.step) for p in builder.from_event(old_eval)) == ("module_2/val_accuracy", 50)
    assert builder.from_event({**old_eval, "replica": 1}) == []
    replica = builder.from_event({**train, "replica": 1})
    assert replica[0].tag.startswith("module_2/replica_1/")
    figures = {
        "elapsed_s": 10.0,
        "train_samples": 1000,
        "compute_s": 7.0,
        "recv_wait_s": 2.0,
        "send_wait_s": 1.0,
        "rss_bytes": 5,
        "gpu_util_percent": None,
    }
    by_tag = {p.tag: p.value for p in rank_points(3, figures, 7)}
    assert by_tag == {
        "rank_3/samples_per_s": 100.0,
        "rank_3/compute_fraction": 0.7,
        "rank_3/input_wait_fraction": 0.2,
        "rank_3/room_wait_fraction": 0.1,
        "rank_3/rss_bytes": 5.0,
    }


def test_follower_reads_only_new_complete_lines(tmp_path: Path) -> None:
    from trgl_pipe.watch.follow import _Tail

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"event": "train", "step": 1}) + "\n")
    tail = _Tail(path)  # a resumed run: what was there is not sent again
    assert tail.read() == []
    with open(path, "a") as handle:
        handle.write(json.dumps({"event": "train", "step": 2}) + "\n" + '{"event": "tr')
    assert tail.read() == [{"event": "train", "step": 2}]
    with open(path, "a") as handle:
        handle.write('ain", "step": 3}\n')
    assert tail.read() == [{"event": "train", "step": 3}]


def profiler_traces(out: Path) -> dict[str, dict]:
    """rank name -> the Chrome trace torch.profiler wrote for it."""
    traces = {}
    for path in sorted((out / "profile").glob("*.pt.trace.json")):
        traces[path.name.split(".")[0]] = json.loads(path.read_text())
    return traces


def test_profile_steps_writes_a_trace_of_those_steps(tiny) -> None:
    cfg = tiny("debug.profile_steps=[2, 3]", "train.epochs=1")
    run_single(cfg, console_summary=False)
    traces = profiler_traces(Path(cfg.out_dir))
    assert list(traces) == ["rank0"]
    names = {e.get("name") for e in traces["rank0"]["traceEvents"]}
    steps = {n for n in names if str(n).startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}  # the two steps, marked by the module's step
    assert any(str(n).startswith("aten::conv") for n in names)


def read_wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file (LevelDB log blocks of protobuf records)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # full / first, or middle / last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows


def wandb_series(rows: list[dict]) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            axis = key.split("/", 1)[0]
            if "/" in key and not key.endswith("/step"):
                series.setdefault(key, {})[row[f"{axis}/step"]] = value
    return series


def test_offline_wandb_run_holds_the_series_and_resume_continues_it(tiny) -> None:
    pytest.importorskip("wandb")
    import shutil

    cfg = tiny(
        "log.wandb.mode=offline",
        "log.wandb.project=trgl-test",
        "checkpoint.every_steps=3",
        "checkpoint.keep=100",
    )
    run_single(cfg, console_summary=False)
    out = Path(cfg.out_dir)
    (first,) = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    found = wandb_series(read_wandb_history(first))
    assert_same(found, read_metrics(out / "metrics.jsonl"))
    run_id = (out / "wandb_run_id").read_text().strip()
    assert first.name == f"run-{run_id}.wandb"
    # resume=auto from step 3 in place: the same W&B run continues from there
    for folder in sorted((out / "checkpoints").iterdir())[1:]:
        shutil.rmtree(folder)
    lines_before = len(read_metrics(out / "metrics.jsonl"))
    again = tiny(f"out_dir={out}", "resume=auto", "log.wandb.mode=offline", "log.wandb.project=trgl-test")
    run_single(again, console_summary=False)
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and {p.name for p in runs} == {f"run-{run_id}.wandb"}
    resumed = wandb_series(read_wandb_history(next(p for p in runs if p != first)))
    assert_same(resumed, read_metrics(out / "metrics.jsonl")[lines_before:])
    assert min(resumed["module_0/loss"]) == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("debug.profile_steps=[3, 2]", "debug.profile_steps must be [first, last] training steps"),
        ("debug.profile_steps=[0, 2]", "debug.profile_steps must be [first, last] training steps"),
        ("log.wandb.mode=cloud", "log.wandb.mode must be one of online | offline | disabled"),
        ("log.wandb.projekt=x", "unknown config key 'log.wandb.projekt'"),
    ],
)
def test_bad_watch_keys_are_one_line_errors(override: str, message: str) -> None:
    from trgl_pipe.config import load_config
    from trgl_pipe.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("[", r"\[")):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "package"), [("log.tensorboard=true", "tensorboard"), ("log.wandb.mode=offline", "wandb")]
)
def test_a_missing_package_is_a_one_line_error_before_any_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    override: str,
    package: str,
) -> None:
    import importlib.util

    from conftest import TINY

    from trgl_pipe.run import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a)
    )
    out = tmp_path / "run"
    assert main([*TINY, f"out_dir={out}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"needs the {package} package: pip install -e '.[{package}]'" in err[0]
    assert not out.exists()


def test_spans_are_contiguous_and_reach_the_file_every_few_seconds(tmp_path: Path, monkeypatch) -> None:
    from trgl_pipe.watch import spans as spans_module
    from trgl_pipe.watch.spans import SpanRecorder, read_spans

    monkeypatch.setattr(spans_module, "FLUSH_S", 0.0)
    path = tmp_path / "rank0.tsv"
    recorder = SpanRecorder(path, {"rank": 0})
    recorder.start()
    for category in ("input", "compute", "room"):
        recorder.until(category)
    # not closed (a rank that died): what was recorded is on disk anyway
    ((meta, spans),) = read_spans(path)
    assert meta["rank"] == 0 and [s[0] for s in spans] == ["input", "compute", "room"]
    assert all(a[2] == b[1] for a, b in itertools.pairwise(spans))
    recorder.close()
    again = SpanRecorder(path, {"rank": 0}, append=True)  # a resumed run adds a segment
    again.start()
    again.until("compute")
    again.close()
    assert [len(s) for _, s in read_spans(path)] == [3, 1]


class _ListSink:
    def __init__(self) -> None:
        self.points: list = []

    def scalars(self, points: list) -> None:
        self.points.extend(points)

    def hparams(self, config: dict, results: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _BoardFailingOnce:
    def __init__(self) -> None:
        self.calls = 0

    def snapshot(self) -> dict:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("snapshot mid-update")
        return {"rank/0": {"step": 2, "elapsed_s": 1.0, "train_samples": 64}}


def test_a_failed_board_read_does_not_lose_the_metrics_lines_already_read(tiny) -> None:
    # the watch reads new metrics lines, then the board; a board read that fails must not take
    # the lines it had consumed with it (the W&B series of a resumed run once came back empty)
    from trgl_pipe.watch.follow import RunWatch

    cfg = tiny()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True)
    metrics = out / "metrics.jsonl"
    metrics.write_text("")
    sink = _ListSink()
    watch = RunWatch(cfg, [sink], world_size=1, poll_s=3600)
    watch.attach_board(_BoardFailingOnce(), {0: 0})
    lines = [{"event": "train", "module": 0, "step": s, "loss": 1.0 / s} for s in (1, 2)]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(RuntimeError, match="mid-update"):
        watch.poll()
    watch.finish(None)  # reads what is left and the board again
    tags = {(p.tag, p.step) for p in sink.points}
    assert {("module_0/loss", 1), ("module_0/loss", 2), ("rank_0/samples_per_s", 2)} <= tags
