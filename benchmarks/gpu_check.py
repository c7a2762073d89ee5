"""The GPU acceptance run: every GPU path of trgl_pipe that one GPU can reach, in a few minutes.

    python benchmarks/gpu_check.py                       # on a GPU machine: about 10 minutes
    python benchmarks/gpu_check.py --device cpu --quick  # the same checks on CPU, smaller (CI)

Checks, each recorded with its figures and a verdict (a failed check does not stop the others;
the exit status is 1 if any failed; a check that needs CUDA is "skipped" in CPU mode):
1. regimes: e2e, parallel, sequential and multi-lap sequential in one process, a few steps each;
2. equivalence: a 4-rank pipeline sharing the one device (host-staged through gloo on a GPU)
   against the single-process parallel regime on the same device, ``train.deterministic=true``:
   every step present in both, per-step losses and final parameters equal, else the largest
   difference (a NaN or a missing step fails);
3. throughput: samples/s of the single-process parallel regime and of 2 and 4 ranks on the one
   device, medians of interleaved repeats, for the quickstart model (synthetic 1×28×28 data, as
   many images as the timed steps need) and ResNet-110 at 96×96 (synthetic);
4. memory: every rank's peak (``torch.cuda.max_memory_allocated``) against plain end-to-end
   training (TRGL off, as the paper measures), ResNet-110, 96×96, batch 64, K = 2/4/8/16, equal
   depth and balanced splits, beside the meta-device estimate of benchmarks/memory.py;
5. speed options: bf16, channels_last, torch.compile (and on a GPU compile with channels_last),
   one short run each, samples/s against fp32;
6. failure: SIGKILL of one rank of the 4-rank one-device pipeline ends the job within
   ``pipeline.timeout_s``;
7. replicas: K=2 stages × R=2 replicas on the one device (gloo, CUDA tensors through pinned host
   memory on a GPU, DDP), with a validation split of one image (an empty evaluation shard):
   the run ends and every evaluation counts each image once;
8. nccl (CUDA): one rank with ``cpu:gloo,cuda:nccl`` and the ("pp","dp") mesh on CUDA: a CUDA
   all-reduce, an NCCL send-to-self of a channels_last activation waited with a timeout, and the
   stall test (does a wait in a helper thread delay the training stream?) — benchmarks/gpu_probes.py;
9. host_syncs (CUDA): host synchronisations per training step under
   ``torch.cuda.set_sync_debug_mode("warn")``: none outside logging steps.
Writes ``<out>/gpu_check.{json,md}`` (``gpu_check_cpu`` on CPU) with machine, versions, command,
and prints a one-screen verdict that also says what one GPU cannot test.
"""

from __future__ import annotations

import argparse
import json
import math
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
from common import (
    ROOT,
    command,
    machine,
    markdown_table,
    page_header,
    steady_throughput,
    torchrun_cmd,
    trgl_cmd,
)

MIB = 2**20
TINY = [
    "data.source=embedded",
    "data.val_size=200",
    "data.test_size=200",
    "data.eval_batch_size=200",
    "log.live=off",
    "checkpoint.every_epochs=0",
]


def throughput_models(quick: bool) -> dict[str, list[str]]:
    """The throughput check's models and their data. Synthetic data of the real shape: timing
    needs as many images as the timed steps, more than the embedded Fashion-MNIST subset holds."""
    if quick:
        return {
            "quickstart": ["data.source=embedded", "data.batch_size=64", "model.depth=14", "model.width=8"]
        }
    return {
        "quickstart": [
            "data.name=synthetic",
            "data.image_size=28",
            "data.channels=1",
            "data.num_classes=10",
            "data.batch_size=128",
            "model.depth=20",
            "model.width=16",
        ],
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


def throughput_steps(quick: bool) -> tuple[int, int]:
    """Timed steps per run and the first steps left out of the rate (warm-up)."""
    return (20, 6) if quick else (120, 30)


def throughput_args(model: list[str], device: str, steps: int) -> list[str]:
    """The overrides of one throughput run: ``steps`` full batches of ``model`` on ``device``."""
    batch = int(next(o for o in model if o.startswith("data.batch_size")).split("=")[1])
    val = 200
    # synthetic data holds the validation images out of its train_size; the embedded set has its own
    train = batch * steps + (val if "data.name=synthetic" in model else 0)
    return [
        *model,
        f"device={device}",
        f"data.val_size={val}",
        "data.test_size=200",
        f"data.train_size={train}",
        "data.eval_batch_size=64",
        "train.epochs=1",
        f"train.max_steps={steps}",
        "train.eval_every_epochs=0",
        "log.every_steps=5",
        "log.live=off",
        "checkpoint.every_epochs=0",
        "model.num_modules=4",
    ]


def compare_steps(a: dict[Any, tuple[float, ...]], b: dict[Any, tuple[float, ...]]) -> dict[str, Any]:
    """Per-step figures of two runs: the steps missing from either, and the largest difference,
    NaN when a value is NaN (``max`` alone would skip a NaN that is not first)."""
    missing = sorted(set(a) ^ set(b))
    gaps = [abs(x - y) for k in set(a) & set(b) for x, y in zip(a[k], b[k], strict=True)]
    largest = math.nan if not gaps or any(math.isnan(g) for g in gaps) else max(gaps)
    return {"missing_steps": [list(k) for k in missing[:10]], "num_missing": len(missing), "largest": largest}


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

    def run(self, name: str, fn: Callable[[], tuple[bool | None, dict[str, Any]]]) -> None:
        """Run one check; ``ok`` None means skipped (it needs CUDA)."""
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
        verdict = "skipped" if ok is None else ("ok" if ok else "FAILED")
        print(f"   {verdict} in {seconds} s: {json.dumps(figures)[:600]}", flush=True)

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
        compared = compare_steps(a, b)
        loss_gap = compared["largest"]
        param_gap = 0.0
        for k in range(4):
            fa = sorted((single / "checkpoints").iterdir())[-1] / f"module-{k}.pt"
            fb = sorted((piped / "checkpoints").iterdir())[-1] / f"module-{k}.pt"
            sa = torch.load(fa, weights_only=True)["stage"]
            sb = torch.load(fb, weights_only=True)["stage"]
            for part in ("body", "head"):
                for name, t in sa[part].items():
                    gap = float((t.double() - sb[part][name].double()).abs().max())  # NaN if any is
                    nan = math.isnan(gap) or math.isnan(param_gap)
                    param_gap = math.nan if nan else max(param_gap, gap)
        s = _summary(piped)
        bitwise = a == b and param_gap == 0.0
        figures = {
            "steps_compared": len(a),
            "steps_missing": compared["num_missing"],
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
        complete = len(a) == 4 * 10 and compared["num_missing"] == 0
        return complete and (bitwise or loss_gap < 1e-4) and not math.isnan(param_gap), figures

    # -- 3 -------------------------------------------------------------------------------------

    def throughput(self) -> tuple[bool, dict[str, Any]]:
        quick = self.args.quick
        models = throughput_models(quick)
        steps, skip = throughput_steps(quick)
        repeats = 1 if quick else 3
        figures: dict[str, Any] = {}
        ok = True
        for name, model in models.items():
            batch = int(next(o for o in model if o.startswith("data.batch_size")).split("=")[1])
            base = throughput_args(model, self.device, steps)
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
        figures: dict[str, Any] = {}
        variants = [
            ("fp32", []),
            ("bf16", ["train.precision=bf16"]),
            ("channels_last", ["train.channels_last=true"]),
        ]
        if quick and self.device == "cpu":
            # a cold inductor compile costs about 45 s of the CI's two cores; tests/test_native_paths.py
            # compiles on the CPU already, so the CPU mode stops at the eager options
            figures["compile"] = {"skipped": "--quick on the CPU: tests/test_native_paths.py compiles there"}
        else:
            variants.append(("compile", ["train.compile=true"]))
        if not quick:
            variants.append(("compile_channels_last", ["train.compile=true", "train.channels_last=true"]))
        for name, extra in variants:
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
        timed = [n for n in figures if "samples_per_s" in figures[n]]
        for name in [n for n in timed if n != "fp32"]:
            figures[name]["ratio_to_fp32"] = round(
                figures[name]["samples_per_s"] / figures["fp32"]["samples_per_s"], 3
            )
        return all(figures[n]["samples_per_s"] > 0 for n in timed), figures

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

    # -- 7 -------------------------------------------------------------------------------------

    def replicas(self) -> tuple[bool, dict[str, Any]]:
        out = self.out("replicas")
        args = [
            *TINY,
            f"device={self.device}",
            "data.train_size=256",
            "data.val_size=1",
            "data.test_size=3",
            "data.eval_batch_size=2",
            "data.batch_size=64",
            "model.depth=14",
            "model.width=8",
            "model.num_modules=2",
            "train.epochs=1",
            "pipeline.replicas=2",
            "pipeline.timeout_s=120",
            f"out_dir={out}",
        ]
        _run(torchrun_cmd(4, args), 900)
        s = _summary(out)
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        counts = sorted({(e["split"], e["count"]) for e in events if e["event"] == "eval"})
        figures = {
            "data_backend": s.get("data_backend"),
            "ranks_devices": [r["device"] for r in s["ranks"]],
            "eval_counts": counts,
            "train_samples_per_stage": [st["train_samples"] for st in s["stages"]],
        }
        ok = counts == [("test", 3), ("val", 1)] and all(self.device in d for d in figures["ranks_devices"])
        return ok, figures

    # -- 8, 9 ----------------------------------------------------------------------------------

    def _probe(self, name: str) -> tuple[bool | None, dict[str, Any]]:
        if self.device != "cuda":
            return None, {"skipped": "needs a CUDA GPU"}
        env = {**_env(4), "MASTER_PORT": str(_free_port())}
        result = _run([sys.executable, str(ROOT / "benchmarks" / "gpu_probes.py"), name], 300, env)
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        return bool(figures.pop("ok")), figures

    def nccl(self) -> tuple[bool | None, dict[str, Any]]:
        return self._probe("nccl")

    def host_syncs(self) -> tuple[bool | None, dict[str, Any]]:
        return self._probe("syncs")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


UNTESTABLE = (
    "What one GPU cannot test: NCCL point-to-point between two GPUs (the pipeline's activations "
    "when every rank has a GPU of its own), NCCL DDP between replicas on different GPUs, and "
    "several nodes. Here ranks share the GPU, so activations and gradients go through gloo."
)


def verdict(results: list[dict[str, Any]]) -> list[str]:
    """One screen: each check's verdict and headline, then what was not tested."""
    lines = []
    for r in results:
        state = "skipped" if r["ok"] is None else ("ok" if r["ok"] else "FAILED")
        figures = {k: v for k, v in r.items() if k not in ("check", "ok", "seconds", "trace")}
        lines.append(f"{state:>7}  {r['check']:<14} {r['seconds']:>6} s  {json.dumps(figures)[:90]}")
    failed = [r["check"] for r in results if r["ok"] is False]
    skipped = [r["check"] for r in results if r["ok"] is None]
    passed = len(results) - len(failed) - len(skipped)
    lines.append(
        f"{passed} of {len(results)} checks passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + (f"; skipped (need CUDA): {', '.join(skipped)}" if skipped else "")
    )
    lines.append(UNTESTABLE)
    return lines


def render(payload: dict[str, Any]) -> str:
    title = "GPU acceptance run" if payload["device"] == "cuda" else "GPU acceptance run, CPU mode"
    lines = [
        *page_header(payload, title),
        markdown_table([{k: r[k] for k in ("check", "ok", "seconds")} for r in payload["checks"]]),
        "",
        UNTESTABLE,
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
            ("replicas", check.replicas),
            ("nccl", check.nccl),
            ("host_syncs", check.host_syncs),
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
    print("\n".join(["", "== verdict", *verdict(check.results)]), flush=True)
    failed = [r["check"] for r in check.results if r["ok"] is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
