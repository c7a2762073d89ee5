"""SIGTERM to a rank of a job that has already failed (trgl_pipe/runtime/preemption.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PROGRAM = """
import os, signal, sys
from trgl_pipe.runtime import preemption
preemption.install(job_failed=lambda: True)
preemption.before_failed_exit(lambda: open(sys.argv[1], "w").write("released"))
os.kill(os.getpid(), signal.SIGTERM)
import time; time.sleep(30)
"""


def test_sigterm_to_a_failed_job_runs_the_cleanups_then_exits_at_once(tmp_path: Path) -> None:
    # rank 0 releases its run folder there: torchrun's SIGTERM used to end it between recording
    # the failure and releasing the folder, leaving an empty run folder behind
    marker = tmp_path / "marker"
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(marker)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 1, result.stderr
    assert marker.read_text() == "released"
