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


@pytest.mark.heavy(110)
def test_gpu_check_passes_in_cpu_mode(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,  # about 2 minutes on an idle 2-core machine; far more when it is shared
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    payload = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    checks = {c["check"]: c for c in payload["checks"]}
    assert list(checks) == [s.name for s in gpu_check.SPECS]
    cuda = ("nccl", "host_syncs", "two_gpu_pipeline", "two_gpu_infopro", "two_gpu_replicas")
    assert all(c["ok"] for name, c in checks.items() if name not in cuda)
    assert all(checks[name]["ok"] is None for name in cuda)  # skipped: they need CUDA
    assert checks["nccl"]["skipped"] == "needs a CUDA GPU"
    assert all(c["estimated_s"] >= 0 for c in checks.values())
    assert result.stdout.splitlines()[1] == "plan:"
    assert checks["replicas"]["eval_counts"] == [["test", 3], ["val", 1]]
    speed = checks["speed_options"]
    assert all(speed[v]["samples_per_s"] > 0 for v in ("fp32", "bf16"))
    assert "skipped" in speed["compile"]  # a cold compile on CPU is tests/test_native_paths.py's
    assert "What one GPU cannot test" in result.stdout
    assert checks["equivalence"]["bitwise"] is True  # gloo on CPU: the pipeline is the same computation
    assert checks["sigkill"]["seconds_to_end"] < checks["sigkill"]["pipeline_timeout_s"]
    assert payload["machine"]["torch"] and payload["command"].startswith("python benchmarks/gpu_check.py")
    assert (tmp_path / "gpu_check_cpu.md").read_text().startswith("# GPU acceptance run, CPU mode")
