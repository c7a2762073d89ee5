"""The golden tests again under another CPU's kernels, so no golden file or bound is CPU-bound.

The tests marked ``golden`` compare against committed numbers or a measured error bound. A CPU of
another vendor picks other vector kernels (ATen's by ``ATEN_CPU_CAPABILITY``, oneDNN's by
``ONEDNN_MAX_CPU_ISA``) and so rounds differently; a golden file recorded on one CPU once failed
on another. Here they run in a child pytest with ATen's scalar kernels and oneDNN's AVX2 ones, the
setting farthest from an AVX-512 Intel CPU and the nearest this machine can emulate of an AVX2 one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2"}


# golden tests that compute no tensor with torch's kernels (report tables recomputed from stored
# JSON with Python floats): no CPU rounds them otherwise, so they run once, in the main session
KERNEL_FREE = ("test_committed_reports.py", "test_parity_table.py")


def _marks_golden(path: Path) -> bool:
    text = path.read_text()
    return "pytest.mark.golden" in text and path.name not in (Path(__file__).name, *KERNEL_FREE)


@pytest.mark.heavy(40)
@pytest.mark.slow
def test_golden_tests_pass_under_another_cpus_kernels() -> None:
    env = {**os.environ, **OTHER_KERNELS}
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert probe.stdout.strip() == "DEFAULT", probe.stdout + probe.stderr  # the switch took effect
    # the files that hold golden tests (collecting the whole suite would cost the child seconds)
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if _marks_golden(p))
    assert len(files) >= 2, files
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "golden", "-q", "-n", "0", "-p", "no:cacheprovider", *files],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1] and "deselected" in result.stdout.splitlines()[-1]
