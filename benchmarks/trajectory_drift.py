"""How far the authors' preset drifts from its recorded trajectory under other CPU kernels, against
what small defects do: the figures behind tests/test_authors_trajectory.py's tolerances.

    python benchmarks/trajectory_drift.py          # 11 variants, one child process each, ~8 min

Each variant trains the preset of tests/data/authors_trajectory.json for its 40 steps per module,
exactly as the test does, in a fresh process (the kernel switches are read when torch loads):

- kernels: ATen's vector kernels (``ATEN_CPU_CAPABILITY``: default = none, avx2) and oneDNN's
  (``ONEDNN_MAX_CPU_ISA=AVX2``), alone and together, which is how another vendor's CPU differs;
- defects: the former kinetic function (one float32 dot, addcmul backward), the learning rate 5%
  off, momentum 0.89 instead of 0.9, tau 10% off, no weight decay.

For each it prints the largest relative difference from the record over steps 0-1 and over all
40 steps, for the loss, the kinetic energy and the parameter checksums (every module).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD_PATH = ROOT / "tests" / "data" / "authors_trajectory.json"
FIRST_STEPS = 2

KERNELS: dict[str, dict[str, str]] = {
    "this CPU": {},
    "ATen default": {"ATEN_CPU_CAPABILITY": "default"},
    "ATen avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "oneDNN AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "ATen avx2 + oneDNN AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "ATen default + oneDNN AVX2 (CI's second)": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
}
DEFECTS: dict[str, list[str]] = {
    "former kinetic function": ["former"],
    "lr x1.05": ["optim.lr=0.0021"],
    "momentum 0.89": ["optim.momentum=0.89"],
    "tau x1.1": ["trgl.tau=1.1"],
    "no weight decay": ["optim.weight_decay=0"],
}


def trajectory(overrides: list[str], former: bool) -> list[dict[str, float]]:
    """Per step, the largest relative difference from the record over the modules."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from test_authors_trajectory import _checksums

    from trgl_pipe.config import load_config
    from trgl_pipe.context import build_context
    from trgl_pipe.models import blocks

    if former:
        from kinetic_precision import _Former

        blocks._SumWithKinetic = _Former
    record = json.loads(RECORD_PATH.read_text())
    expected = {(s["step"], s["module"]): s for s in record["steps"]}
    num_steps = 1 + max(step for step, _ in expected)
    cfg = load_config(
        ROOT / record["preset"], [*record["overrides"], "out_dir=/nonexistent", "log.live=off", *overrides]
    )
    torch.set_num_threads(record["threads"])
    ctx = build_context(cfg, torch.device("cpu"))
    stages = [ctx.build_stage(k) for k in range(ctx.num_modules)]
    rows: list[dict[str, float]] = []
    for epoch in range(cfg.train.epochs):
        for x, y in ctx.batches.train_batches(epoch):
            if len(rows) == num_steps:
                break
            row = {"loss": 0.0, "kinetic": 0.0, "checksums": 0.0}
            for k, stage in enumerate(stages):
                theirs = expected[(len(rows), k)]
                x = stage.train_step(x, y)
                ours = {"loss": float(stage.last_loss), "kinetic": float(stage.last_kinetic)}
                for key, value in ours.items():
                    row[key] = max(row[key], abs(value - theirs[key]) / abs(theirs[key]))
                for a, b in zip(_checksums(stage), theirs["checksums"], strict=True):
                    row["checksums"] = max(row["checksums"], abs(a - b) / abs(b))
            rows.append(row)
    return rows


def summarise(name: str, kind: str, steps: list[dict[str, float]]) -> dict[str, object]:
    row: dict[str, object] = {"variant": name, "kind": kind}
    for key in ("loss", "kinetic", "checksums"):
        row[f"{key} steps 0-{FIRST_STEPS - 1}"] = max(s[key] for s in steps[:FIRST_STEPS])
    for key in ("loss", "kinetic", "checksums"):
        row[f"{key} 40 steps"] = max(s[key] for s in steps)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(trajectory([a for a in args.child if a != "former"], "former" in args.child)))
        return
    from common import write_results

    variants = [(n, "kernels", env, []) for n, env in KERNELS.items()]
    variants += [(n, "defect", {}, ov) for n, ov in DEFECTS.items()]
    rows, per_step = [], {}
    for name, kind, env, overrides in variants:
        child = [sys.executable, __file__, "--child", *overrides]
        out = subprocess.run(
            child, capture_output=True, text=True, check=True, timeout=1200, env={**os.environ, **env}
        )
        per_step[name] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(summarise(name, kind, per_step[name]))
        print(rows[-1], flush=True)
    kernels = [r for r in rows if r["kind"] == "kernels" and r["variant"] != "this CPU"]
    notes = [
        "Largest relative difference from the recorded trajectory of the authors' code, over the 4 "
        "modules and the steps named; one run per variant (the figures are deterministic for a given "
        "CPU and kernel setting); one thread.",
        "Kernel settings emulate another CPU on this one; defects run with this CPU's own kernels.",
        "Worst over the other kernel settings: "
        + ", ".join(f"{col} {max(float(r[col]) for r in kernels):.2g}" for col in rows[0] if " " in col),
    ]
    write_results(
        "trajectory_drift",
        "The authors' preset against its recorded trajectory: other kernels against small defects",
        rows,
        notes,
        extra={"per_step": per_step},
    )


if __name__ == "__main__":
    main()
