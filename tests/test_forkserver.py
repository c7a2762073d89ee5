"""The fork server the suite's torchruns start their processes from (tests/forkserver.py): a forked
process must look like a plain ``python`` to its launcher (exit status, output, signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import FORKSERVER, ROOT, TORCHRUN_ENV, _forkserver, forkserver_env
from forkserver import ADDRESS

pytestmark = pytest.mark.skipif(os.environ.get(ADDRESS) == "off", reason=f"{ADDRESS}=off: no fork server")


def _start(code: str, **extra: str) -> subprocess.Popen:
    env = forkserver_env({**TORCHRUN_ENV, **extra})
    return subprocess.Popen(
        [sys.executable, str(FORKSERVER), "-c", code],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_forked_process_has_the_exit_code_output_and_environment_of_a_plain_one() -> None:
    proc = _start("import os, sys; print(os.getppid(), os.environ['RANK']); sys.exit(3)", RANK="2")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    parent, rank = out.split()
    assert int(parent) == _forkserver[0].pid and rank == "2"  # forked by the server, RANK is per process


def test_an_environment_read_at_import_gets_a_fresh_interpreter() -> None:
    # ATEN_CPU_CAPABILITY is read once torch has loaded: the server's torch would ignore it
    proc = _start(
        "import os; print(os.getpid(), os.environ['ATEN_CPU_CAPABILITY'])", ATEN_CPU_CAPABILITY="default"
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split() == [str(proc.pid), "default"]  # the client became a plain python (exec)


def test_an_uncaught_exception_and_a_signal_death_end_the_client_alike() -> None:
    raised = _start("raise ValueError('boom')")
    _, err = raised.communicate(timeout=60)
    assert raised.returncode == 1 and err.splitlines()[-1] == "ValueError: boom"
    killed = _start("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL


def test_signals_reach_the_child_and_a_killed_client_takes_it_along(tmp_path: Path) -> None:
    handler = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (os.write(1, b'TERM\\n'), sys.exit(5)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = _start(handler)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 5 and out == "TERM\n", err

    pid_file = tmp_path / "pid"
    proc = _start(f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = psutil.Process(int(pid_file.read_text()))
    proc.kill()
    proc.communicate(timeout=60)
    child.wait(timeout=10)  # psutil.TimeoutExpired if the server left it running
