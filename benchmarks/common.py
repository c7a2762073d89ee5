"""Shared pieces of the benchmarks: machine facts, results files, throughput from metrics.

Every benchmark prints a table and writes ``benchmarks/results/<name>.json`` and ``.md`` with the
machine, versions, device and the exact command, so any number can be traced and rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, GPU, torch and Python versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    return info


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def page_header(payload: dict[str, Any], title: str) -> list[str]:
    """A results page's first lines: its title, the command that made it and the machine it ran on."""
    info = payload["machine"]
    return [
        f"# {title}",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu'] or 'none'}; "
        f"torch {info['torch']}, Python {info['python']}; {info['date']}",
        "",
    ]


def render_markdown(payload: dict[str, Any], columns: list[str] | None = None) -> str:
    """The Markdown page of a results JSON (``python benchmarks/common.py render NAME`` redoes it)."""
    lines = [
        *page_header(payload, payload["title"]),
        markdown_table(payload["rows"], columns or payload.get("columns")),
        "",
    ]
    lines += [f"- {n}" for n in payload["notes"]]
    for table in payload.get("tables", []):  # further tables of the same runs, each under its title
        lines += ["", f"## {table['title']}", "", markdown_table(table["rows"])]
    return "\n".join(lines) + "\n"


def write_results(
    name: str,
    title: str,
    rows: list[dict[str, Any]],
    notes: list[str],
    extra: dict[str, Any] | None = None,
    columns: list[str] | None = None,
) -> Path:
    """Write JSON and Markdown results and print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "title": title,
        "command": command(),
        "machine": machine(),
        "rows": rows,
        "notes": notes,
        "columns": columns,
        **(extra or {}),
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(render_markdown(payload))
    print(markdown_table(rows, columns))
    for n in notes:
        print(f"- {n}")
    return RESULTS / f"{name}.json"


def run(
    cmd: list[str], timeout: float = 1800, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-2000:] + result.stderr[-4000:])
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(cmd)}")
    return result


def trgl_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "trgl_pipe.run", *args]


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "trgl_pipe.run",
        *args,
    ]


def workload_parser(
    description: str, k: int = 2, steps: int = 100, skip: int = 20
) -> argparse.ArgumentParser:
    """The arguments every training benchmark shares (the network, batch, run length, threads)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--k", type=int, default=k, help="modules (pipeline ranks)")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per pipeline rank")
    parser.add_argument("--steps", type=int, default=steps, help="training steps per run")
    parser.add_argument("--skip", type=int, default=skip, help="steps left out of the steady-state rate")
    parser.add_argument("--trgl", action=argparse.BooleanOptionalAction, default=True)
    return parser


def workload(args: Any, out_dir: Path, k: int | None = None, split: str | None = None) -> list[str]:
    """The benchmarks' standard run: the embedded Fashion-MNIST subset, a fixed number of steps,
    no evaluation or checkpoint on the way (the final evaluation uses the training batch size, so
    it sets neither the rate nor the memory peak). ``args`` carries batch, depth, width, k, steps
    and, if present, split and trgl."""
    split = split or getattr(args, "split", None)
    trgl = getattr(args, "trgl", True)
    return [
        "data.source=embedded",
        "data.val_size=1000",
        f"data.train_size={args.batch * 50}",
        f"data.batch_size={args.batch}",
        f"data.eval_batch_size={args.batch}",
        f"model.depth={args.depth}",
        f"model.width={args.width}",
        f"model.num_modules={k or args.k}",
        *([f"model.split={split}"] if split else []),
        "train.epochs=100",
        f"train.max_steps={args.steps}",
        "train.eval_every_epochs=0",
        "log.every_steps=5",
        "log.live=off",
        "checkpoint.every_epochs=0",
        f"trgl.enabled={str(trgl).lower()}",
        f"out_dir={out_dir}",
    ]


def steady_throughput(out_dir: Path, batch_size: int, skip_steps: int) -> float:
    """Samples/s of the last module between its step ``skip_steps`` and its last step.

    The last module finishes a batch only after every module before it did, so its rate is the
    rate of the whole pipeline; skipping the first steps leaves out start-up and filling.
    """
    events = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(e["module"] for e in events if e["event"] == "train")
    points = [(e["step"], e["time_s"]) for e in events if e["event"] == "train" and e["module"] == last]
    points = [p for p in points if p[0] >= skip_steps]
    (s0, t0), (s1, t1) = points[0], points[-1]
    return (s1 - s0) * batch_size / (t1 - t0)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "render":
        data = json.loads((RESULTS / f"{sys.argv[2]}.json").read_text())
        (RESULTS / f"{sys.argv[2]}.md").write_text(render_markdown(data))
    else:
        raise SystemExit("usage: python benchmarks/common.py render NAME")
