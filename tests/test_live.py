"""The live view: progress, ETA, validation accuracy; a rich table on a terminal, plain blocks otherwise."""

from __future__ import annotations

import time

from rich.console import Console

from trgl_pipe.watch.live import LiveView, LocalBoard, Publisher, progress_line

SNAPSHOT = {
    "module": 1,
    "epoch": 1,
    "epochs": 6,
    "step": 120,
    "total_steps": 360,
    "elapsed_s": 60.0,
    "samples_per_s": 431.7,
    "loss": 0.81234,
    "weight": "τ=1e+05",
    "kinetic": 2541.2,
    "val_accuracy": 0.8512,
    "buffer": 1.5,
    "recv_wait_s": 0.4,
    "send_wait_s": 0.1,
}
CPU = {"cpu_percent": 180.0, "rss_bytes": 3 * 1024**3, "gpu_device_util_percent": None}
GPU = {
    "cpu_percent": 100.0,
    "rss_bytes": 2 * 1024**3,
    "gpu_process_memory_bytes": 12 * 1024**3,
    "gpu_process_sm_percent": 45.0,
    "gpu_device_util_percent": 97.0,
    "gpu_device_memory_used_bytes": 31 * 1024**3,
    "gpu_memory_total_bytes": 80 * 1024**3,
    "gpu_device_power_w": 412.0,
}


def test_progress_eta_follow_the_slowest_module() -> None:
    fast = {**SNAPSHOT, "module": 0, "step": 200, "epoch": 3}
    line = progress_line([fast, SNAPSHOT])
    # the slowest module has done 120 of 360 steps in 60 s: 120 s to go, in its epoch 2 of 6
    assert line == "epoch 2/6 · step 120/360 (33%) · 1:00 elapsed · ETA 2:00"
    assert progress_line([]) == "starting"


def test_rich_table_has_a_row_per_module_and_the_devices() -> None:
    board = LocalBoard()
    board.publish("module/1", SNAPSHOT)
    board.publish("module/0", {**SNAPSHOT, "module": 0, "buffer": None, "val_accuracy": None})
    board.publish("rank/0", GPU)
    board.publish("rank/1", CPU)
    view = LiveView(board, "rich", 1.0, "title")
    console = Console(record=True, width=160)
    console.print(view._table())
    text = console.export_text()
    assert "ETA 2:00" in text and "samples/s" in text and "val acc %" in text
    lines = [line for line in text.splitlines() if "τ=1e+05" in line]
    assert len(lines) == 2 and lines[0].split("│")[1].strip() == "0"  # sorted by module
    assert "0.8123" in lines[1] and "432" in lines[1] and "85.12" in lines[1]
    assert "rank 0 gpu sm 45% 12.0 GiB · device 97% 31.0/80.0 GiB 412 W" in text
    assert "rank 1 cpu 180% 3.0 GiB" in text


def test_plain_mode_prints_one_compact_block_per_interval(capsys) -> None:
    board = LocalBoard()
    publisher = Publisher(board, "module/1", interval_s=0.05)
    assert publisher.due()
    publisher.publish(SNAPSHOT)
    assert not publisher.due()  # rate-limited
    board.publish("rank/0", CPU)
    with LiveView(board, "auto", 0.15, "title"):  # pytest's stdout is not a terminal
        time.sleep(0.4)
    out = capsys.readouterr().out.splitlines()
    headers = [line for line in out if "ETA" in line]
    assert 1 <= len(headers) <= 3  # one block per interval, not a line per module every poll
    block = out[out.index(headers[0]) : out.index(headers[0]) + 3]
    assert block[0] == "[live] title · epoch 2/6 · step 120/360 (33%) · 1:00 elapsed · ETA 2:00"
    assert block[1].startswith("[live]   module 1: epoch=1 step=120 samples/s=432 loss=0.8123")
    assert "val acc %=85.12" in block[1]
    assert block[2] == "[live]   rank 0 cpu 180% 3.0 GiB"


def test_without_a_view_the_device_is_still_sampled_for_the_summary() -> None:
    class Counting:
        calls = 0

        def sample(self) -> dict:
            Counting.calls += 1
            return dict(CPU)

    board = LocalBoard()
    view = LiveView(board, "off", None, "title", Counting())
    view._sample()
    assert Counting.calls == 1 and board.snapshot()["rank/0"] == CPU
