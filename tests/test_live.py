"""The live view: a rich table on a terminal, plain lines otherwise."""

from __future__ import annotations

import time

from rich.console import Console

from trgl_pipe.live import LiveView, LocalBoard, Publisher

SNAPSHOT = {
    "module": 1,
    "epoch": 0,
    "step": 12,
    "samples_per_s": 431.7,
    "loss": 0.81234,
    "weight": "τ=1e+05",
    "kinetic": 2541.2,
    "buffer": 1.5,
    "recv_wait_s": 0.4,
    "send_wait_s": 0.1,
}


def test_rich_table_has_a_row_per_module() -> None:
    board = LocalBoard()
    board.publish(1, SNAPSHOT)
    board.publish(0, {**SNAPSHOT, "module": 0, "buffer": None})
    view = LiveView(board, "rich", 1.0, "title")
    console = Console(record=True, width=140)
    console.print(view._table())
    text = console.export_text()
    assert "samples/s" in text and "recv wait s" in text
    lines = [line for line in text.splitlines() if "τ=1e+05" in line]
    assert len(lines) == 2 and lines[0].split("│")[1].strip() == "0"  # sorted by module
    assert "0.8123" in lines[1] and "432" in lines[1]


def test_plain_lines_when_not_a_terminal(capsys) -> None:
    board = LocalBoard()
    publisher = Publisher(board, 1, interval_s=0.05)
    assert publisher.due()
    publisher.publish(SNAPSHOT)
    assert not publisher.due()  # rate-limited
    with LiveView(board, "auto", 0.05, "title"):  # pytest's stdout is not a terminal
        time.sleep(0.2)
    out = capsys.readouterr().out
    assert "[live] module=1 epoch=0 step=12 samples/s=432 loss=0.8123" in out
