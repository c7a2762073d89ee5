"""The GPU acceptance run: every GPU path of trgl_pipe exercised in a few minutes on one GPU.

    python benchmarks/gpu_check.py                       # on a GPU machine: at most ~8 minutes
    python benchmarks/gpu_check.py --device cpu --quick  # the same checks on CPU, smaller (CI)

Checks, each recorded with its figures and a pass/fail verdict (a failed check does not stop the
others; the exit status is 1 if any failed):
1. regimes: e2e, parallel, sequential and multi-lap sequential in one process, a few steps each;
2. equivalence: a 4-rank pipeline sharing the one device (host-staged through gloo on a GPU)
   against the single-process parallel regime on the same device, ``train.deterministic=true``:
   per-step losses and final parameters equal, else the largest difference;
3. throughput: samples/s of the single-process parallel regime and of 2 and 4 ranks on the one
   device, medians of interleaved repeats, for the quickstart model and ResNet-110 at 96×96
   (synthetic data);
4. memory: every rank's peak (``torch.cuda.max_memory_allocated``) against plain end-to-end
   training (TRGL off, as the paper measures), ResNet-110, 96×96, batch 64, K = 2/4/8/16, equal
   depth and balanced splits, beside the meta-device estimate of benchmarks/memory.py;
5. speed options: bf16, channels_last and torch.compile, one short run each, samples/s against fp32;
6. failure: SIGKILL of one rank of the 4-rank one-device pipeline ends the job within
   ``pipeline.timeout_s``.
Writes ``<out>/gpu_check.{json,md}`` (``gpu_check_cpu`` on CPU) with machine, versions, command.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import ROOT, command, machine, markdown_table, steady_throughput, torchrun_cmd, trgl_cmd

MIB = 2**20
TINY = [
    "data.source=embedded",
    "data.val_size=200",
    "data.test_size=200",
    "data.eval_batch_size=200",
    "log.live=off",
    "checkpoint.every_epochs=0",
]


def _env(threads: int = 1) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env or _env())
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}: {' '.join(cmd[-6:])}\n{result.stderr[-1500:]}")
    return result


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


class Check:
    """Runs the checks, records each one's figures and verdict, never stops at a failure."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.results: list[dict[str, Any]] = []
        self.device = args.device

    def run(self, name: str, fn: Callable[[], tuple[bool, dict[str, Any]]]) -> None:
        t0 = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            ok, figures = fn()
        except Exception as error:
            ok, figures = (
                False,
                {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-1500:]},
            )
        seconds = round(time.monotonic() - t0, 1)
        self.results.append({"check": name, "ok": ok, "seconds": seconds, **figures})
        print(f"   {'ok' if ok else 'FAILED'} in {seconds} s: {json.dumps(figures)[:600]}", flush=True)

    def out(self, name: str) -> Path:
        return self.work / name

    # -- 1 -------------------------------------------------------------------------------------

    def regimes(self) -> tuple[bool, dict[str, Any]]:
        figures = {}
        for regime, extra in (
            ("e2e", ["trgl.enabled=false"]),
            ("parallel", []),
            ("sequential", []),
            ("multilap", ["train.laps=2"]),
        ):
            out = self.out(f"regime-{regime}")
            args = [
                *TINY,
                f"device={self.device}",
                "data.train_size=256",
                "data.batch_size=64",
                "model.depth=8",
                "model.width=8",
                "model.num_modules=2",
                "train.epochs=2",
                "train.max_steps=3",
                f"train.regime={regime}",
                f"out_dir={out}",
                *extra,
            ]
            _run(trgl_cmd(args), 600)
            s = _summary(out)
            figures[regime] = {
                "device": s["ranks"][0]["device"],
                "steps": [m["num_steps"] for m in s["modules"]],
                "test_accuracy": s["best_test_accuracy"],
            }
        ok = all(self.device in f["device"] and all(n > 0 for n in f["steps"]) for f in figures.values())
        return ok, figures

    # -- 2 -------------------------------------------------------------------------------------

    def equivalence(self) -> tuple[bool, dict[str, Any]]:
        common = [
            *TINY,
            f"device={self.device}",
            "data.train_size=300",
            "data.batch_size=64",
            "model.depth=14",
            "model.width=8",
            "model.num_modules=4",
            "train.epochs=2",
            "train.deterministic=true",
            "train.num_threads=1",
            "log.every_steps=1",
            "checkpoint.every_epochs=1",
        ]
        single, piped = self.out("eq-single"), self.out("eq-pipe")
        _run(trgl_cmd([*common, f"out_dir={single}"]), 600)
        _run(torchrun_cmd(4, [*common, f"out_dir={piped}", "pipeline.timeout_s=120"]), 900)

        def steps(out: Path) -> dict:
            events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            return {
                (e["module"], e["step"]): (e["loss"], e["ce"], e["kinetic"])
                for e in events
                if e["event"] == "train"
            }

        a, b = steps(single), steps(piped)
        loss_gap = max(
            (abs(x - y) for k in a for x, y in zip(a[k], b.get(k, (float("nan"),) * 3), strict=True)),
            default=float("nan"),
        )
        param_gap = 0.0
        for k in range(4):
            fa = sorted((single / "checkpoints").iterdir())[-1] / f"module-{k}.pt"
            fb = sorted((piped / "checkpoints").iterdir())[-1] / f"module-{k}.pt"
            sa = torch.load(fa, weights_only=True)["stage"]
            sb = torch.load(fb, weights_only=True)["stage"]
            for part in ("body", "head"):
                for name, t in sa[part].items():
                    param_gap = max(param_gap, float((t.double() - sb[part][name].double()).abs().max()))
        s = _summary(piped)
        bitwise = a == b and param_gap == 0.0
        figures = {
            "steps_compared": len(a),
            "bitwise": bitwise,
            "largest_loss_difference": loss_gap,
            "largest_parameter_difference": param_gap,
            "data_backend": s.get("data_backend"),
            "ranks_devices": [r["device"] for r in s["ranks"]],
        }
        if not bitwise:
            figures["reason"] = (
                "different kernels in the two processes (cuDNN/cuBLAS algorithm choice or reduction order) "
                "despite train.deterministic=true"
            )
        return len(a) == 4 * 10 and (bitwise or loss_gap < 1e-4), figures

    # -- 3 -------------------------------------------------------------------------------------

    def throughput(self) -> tuple[bool, dict[str, Any]]:
        quick = self.args.quick
        models = {
            "quickstart": ["data.source=embedded", "data.batch_size=128", "model.depth=20", "model.width=16"],
            "resnet110_96px": [
                "data.name=synthetic",
                "data.image_size=96",
                "data.channels=3",
                "data.batch_size=64",
                "model.depth=110",
                "model.block=postact",
                "aux.pool_size=8",
            ],
        }
        if quick:
            models = {
                "quickstart": [
                    "data.source=embedded",
                    "data.batch_size=64",
                    "model.depth=14",
                    "model.width=8",
                ]
            }
        steps, skip = (20, 6) if quick else (120, 30)
        repeats = 1 if quick else 3
        figures: dict[str, Any] = {}
        ok = True
        for name, model in models.items():
            batch = int(next(o for o in model if o.startswith("data.batch_size")).split("=")[1])
            base = [
                *model,
                f"device={self.device}",
                "data.val_size=200",
                "data.test_size=200",
                f"data.train_size={batch * steps}",
                "data.eval_batch_size=64",
                "train.epochs=1",
                f"train.max_steps={steps}",
                "train.eval_every_epochs=0",
                "log.every_steps=5",
                "log.live=off",
                "checkpoint.every_epochs=0",
                "model.num_modules=4",
            ]
            rates: dict[str, list[float]] = {"single": [], "2 ranks": [], "4 ranks": []}
            for rep in range(repeats):  # interleaved: the variants share the machine's drifts
                for variant in rates:
                    out = self.out(f"tp-{name}-{variant.replace(' ', '')}-{rep}")
                    if variant == "single":
                        _run(trgl_cmd([*base, f"out_dir={out}"]), 900)
                    else:
                        n = int(variant.split()[0])
                        extra = [] if n == 4 else ["pipeline.modules_per_rank=2"]
                        _run(
                            torchrun_cmd(n, [*base, *extra, f"out_dir={out}", "pipeline.timeout_s=300"]), 900
                        )
                    rates[variant].append(steady_throughput(out, batch, skip))
            medians = {v: round(statistics.median(r), 1) for v, r in rates.items()}
            figures[name] = {
                "samples_per_s_median": medians,
                "spread": {v: [round(min(r), 1), round(max(r), 1)] for v, r in rates.items()},
                "repeats": repeats,
                "ratio_to_single": {v: round(medians[v] / medians["single"], 3) for v in medians},
            }
            ok = ok and all(m > 0 for m in medians.values())
        return ok, figures

    # -- 4 -------------------------------------------------------------------------------------

    def memory(self) -> tuple[bool, dict[str, Any]]:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import memory as mem  # benchmarks/memory.py

        quick = self.args.quick
        path, extra, _ = mem.ROWS["resnet110"]  # ResNet-110, 96x96, batch 64 (quick: ResNet-20, 32x32)
        extra = [*extra, "model.depth=20"] if quick else extra
        ks = [2, 4] if quick else [2, 4, 8, 16]
        image = 32 if quick else None
        rows = []
        estimate = mem.Setting(
            mem.default_args(device="meta", batch=16 if quick else None), path, extra, image
        )
        rows += [{**row, "device": "meta"} for row in mem.memory_rows(estimate, ks)]
        if self.device == "cuda":
            measured = mem.Setting(
                mem.default_args(device="cuda", batch=16 if quick else None), path, extra, image
            )
            rows += [{**row, "device": "cuda"} for row in mem.memory_rows(measured, ks)]
        return bool(rows), {
            "rows": rows,
            "note": "cuda rows: torch.cuda.max_memory_allocated; meta: estimate",
        }

    # -- 5 -------------------------------------------------------------------------------------

    def speed_options(self) -> tuple[bool, dict[str, Any]]:
        quick = self.args.quick
        steps, skip = (20, 8) if quick else (100, 30)
        batch = 64
        base = [
            *TINY,
            f"device={self.device}",
            f"data.batch_size={batch}",
            f"data.train_size={batch * steps}",
            "model.depth=8" if quick else "model.depth=20",
            "model.width=8" if quick else "model.width=16",
            "model.num_modules=1" if quick else "model.num_modules=2",
            "train.epochs=1",
            f"train.max_steps={steps}",
            "train.eval_every_epochs=0",
            "log.every_steps=2",
        ]
        figures = {}
        for name, extra in (
            ("fp32", []),
            ("bf16", ["train.precision=bf16"]),
            ("channels_last", ["train.channels_last=true"]),
            ("compile", ["train.compile=true"]),
        ):
            out = self.out(f"speed-{name}")
            env = {
                **_env(1 if self.device == "cpu" else 4),
                "TORCHINDUCTOR_CACHE_DIR": str(self.work / "inductor"),
            }
            _run(trgl_cmd([*base, *extra, f"out_dir={out}"]), 900, env)
            s = _summary(out)
            figures[name] = {
                "samples_per_s": round(steady_throughput(out, batch, skip), 1),
                "test_accuracy": s["best_test_accuracy"],
            }
        for name in ("bf16", "channels_last", "compile"):
            figures[name]["ratio_to_fp32"] = round(
                figures[name]["samples_per_s"] / figures["fp32"]["samples_per_s"], 3
            )
        return all(f["samples_per_s"] > 0 for f in figures.values()), figures

    # -- 6 -------------------------------------------------------------------------------------

    def sigkill(self) -> tuple[bool, dict[str, Any]]:
        import psutil

        timeout_s = 20
        out = self.out("killed")
        args = [
            *TINY,
            f"device={self.device}",
            "data.train_size=2000",
            "data.batch_size=64",
            "model.depth=14",
            "model.num_modules=4",
            "train.epochs=50",
            f"pipeline.timeout_s={timeout_s}",
            "debug.trace=true",
            f"out_dir={out}",
        ]
        proc = subprocess.Popen(
            torchrun_cmd(4, args),
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        trace = out / "trace.rank3.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (trace.exists() and "TRAIN" in trace.read_text()):
            time.sleep(0.2)
        victim = None
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == "2" and "trgl_pipe.run" in " ".join(child.cmdline()):
                    victim = child.pid
            except psutil.Error:
                continue
        if victim is None:
            proc.kill()
            return False, {"error": "rank 2 never started training"}
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=timeout_s + 120)
        elapsed = time.monotonic() - t0
        named = [line for line in stderr.splitlines() if line.startswith("error:")]
        return (proc.returncode != 0 and elapsed < timeout_s), {
            "seconds_to_end": round(elapsed, 1),
            "pipeline_timeout_s": timeout_s,
            "exit_code": proc.returncode,
            "errors": named[:4],
        }


def render(payload: dict[str, Any]) -> str:
    info = payload["machine"]
    lines = [
        "# GPU acceptance run" if payload["device"] == "cuda" else "# GPU acceptance run, CPU mode",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu'] or 'none'}; "
        f"torch {info['torch']}, Python {info['python']}; {info['date']}",
        "",
        markdown_table([{k: r[k] for k in ("check", "ok", "seconds")} for r in payload["checks"]]),
        "",
    ]
    for r in payload["checks"]:
        figures = {k: v for k, v in r.items() if k not in ("check", "ok", "seconds", "trace")}
        lines += [f"## {r['check']}", "", "```json", json.dumps(figures, indent=1)[:6000], "```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer repeats (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--only", nargs="+", help="run only these checks")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU; use --device cpu --quick", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {args.device}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        check = Check(args, Path(tmp))
        for name, fn in (
            ("regimes", check.regimes),
            ("equivalence", check.equivalence),
            ("throughput", check.throughput),
            ("memory", check.memory),
            ("speed_options", check.speed_options),
            ("sigkill", check.sigkill),
        ):
            if not args.only or name in args.only:
                check.run(name, fn)
    payload = {
        "benchmark": "gpu_check",
        "device": args.device,
        "quick": args.quick,
        "command": command(),
        "machine": machine(),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        },
        "checks": check.results,
    }
    name = "gpu_check" if args.device == "cuda" else "gpu_check_cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(render(payload))
    failed = [r["check"] for r in check.results if not r["ok"]]
    print(
        f"{len(check.results) - len(failed)} of {len(check.results)} checks passed"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
