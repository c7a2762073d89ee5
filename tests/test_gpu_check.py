"""The GPU acceptance script in its CPU mode, so it cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


# on the CPU these three repeat tests/multiproc's (the pipeline equals one process, a SIGKILLed rank
# ends the job, replicas compute the data-parallel reference) at 30-40 s of CI: their plan lines are
# checked here, their code runs on a GPU
ELSEWHERE = ("equivalence", "sigkill", "replicas")


@pytest.mark.heavy(70)
def test_gpu_check_passes_in_cpu_mode(tmp_path: Path) -> None:
    only = [s.name for s in gpu_check.SPECS if s.name not in ELSEWHERE]
    command = ["benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out", str(tmp_path), "--only"]
    result = subprocess.run(
        [sys.executable, *command, *only],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,  # about a minute on an idle 2-core machine; far more when it is shared
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    payload = json.loads((tmp_path / f"gpu_check_cpu_{'_'.join(only)}.json").read_text())
    checks = {c["check"]: c for c in payload["checks"]}
    assert list(checks) == only
    cuda = ("nccl", "host_syncs", "two_gpu_pipeline", "two_gpu_infopro", "two_gpu_replicas")
    assert all(c["ok"] for name, c in checks.items() if name not in cuda)
    assert all(checks[name]["ok"] is None for name in cuda)  # skipped: they need CUDA
    assert checks["nccl"]["skipped"] == "needs a CUDA GPU"
    assert all(c["estimated_s"] >= 0 for c in checks.values())
    assert result.stdout.splitlines()[1] == "plan:"
    speed = checks["speed_options"]
    assert all(speed[v]["samples_per_s"] > 0 for v in ("fp32", "bf16"))
    assert "skipped" in speed["compile"]  # a cold compile on CPU is tests/test_native_paths.py's
    assert "What one GPU cannot test" in result.stdout
    assert payload["machine"]["torch"] and payload["command"].startswith("python benchmarks/gpu_check.py")
    assert (
        (tmp_path / f"gpu_check_cpu_{'_'.join(only)}.md")
        .read_text()
        .startswith("# GPU acceptance run, CPU mode")
    )


def test_the_plan_lists_every_check_with_its_estimate(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--plan"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    plan = result.stdout.split("plan:", 1)[1]
    assert all(f"{spec.name}" in plan for spec in gpu_check.SPECS)
    assert all(name in plan for name in ELSEWHERE)
