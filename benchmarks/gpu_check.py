"""The GPU acceptance run: every GPU path of trgl_pipe one or two GPUs can reach, in minutes.

    python benchmarks/gpu_check.py                       # one H100: about 5.5 minutes (estimated)
    python benchmarks/gpu_check.py --only correctness    # a group (or checks) at a time
    python benchmarks/gpu_check.py --plan                # the plan and the pre-flight, nothing run
    python benchmarks/gpu_check.py --device cpu --quick  # the same checks on CPU, smaller (CI)

It first prints the plan (each check's estimated seconds) and a pre-flight of what the checks need
(CUDA, torchvision, a resolvable host name for torchrun --standalone, a C compiler and Python's
headers for torch.compile, two GPUs): a check whose need is missing is skipped with one line.
It installs nothing. Results are written after every check, so a failure or a kill keeps what was
measured. A failed check does not stop the others; the exit status is 1 if any failed.

Checks by group (``--only`` takes group or check names):
- correctness: regimes (e2e, parallel, sequential, multi-lap, a few steps each, in this process);
  search (SEDONA's search, a few meta-steps, against the same search on the CPU);
  equivalence (a 4-rank pipeline sharing the one device against the one-process parallel regime,
  ``train.deterministic=true``: per-step losses and final parameters equal, else the largest
  difference); sigkill (SIGKILL of one rank of the 4-rank pipeline ends the job within
  ``pipeline.timeout_s``); replicas (K=2 × R=2 on the one device with an empty evaluation shard:
  the run ends and every evaluation counts each image once).
- speed: throughput (samples/s of one process, 2 and 4 ranks on the one device, ResNet-110 at
  96×96, medians of interleaved repeats); speed_options (fp32, bf16, channels_last, compile with
  channels_last: samples/s against fp32).
- memory: every rank's peak against end-to-end training, ResNet-110 at 96×96, K = 2/4/8/16, beside
  the meta-device estimate of benchmarks/memory.py.
- cuda: nccl (``cpu:gloo,cuda:nccl`` and the mesh on one rank, an NCCL send-to-self, the stall
  test: benchmarks/gpu_probes.py); host_syncs (host synchronisations per training step).
- multi_gpu (two or more GPUs): K=2 over NCCL against one process; InfoPro at K=4 on two ranks
  (the image follows each batch over NCCL) against one process; R=2 replicas with NCCL DDP.
Writes ``<out>/gpu_check.{json,md}`` (``gpu_check_cpu`` on CPU; ``_<names>`` with ``--only``).
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
from dataclasses import dataclass
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
    # one model on a GPU (the paper's deepest, at STL-10's size): the runs must fit the lent time
    return {
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
    return (20, 6) if quick else (80, 20)


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


def _train_here(args: list[str]) -> None:
    """One run in this process (``trgl_pipe.run.main``, what the CLI runs): a process start costs
    seconds, four of them the regimes check's most. The run's console output goes to ours."""
    from trgl_pipe.run import main

    code = main([*args, "train.num_threads=1"])
    if code != 0:
        raise RuntimeError(f"exit {code}: {' '.join(args[-6:])}")


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


class Check:
    """Runs the checks, records each one's figures and verdict, never stops at a failure."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.results: list[dict[str, Any]] = []
        self.device = args.device
        self.missing: dict[str, str | None] = {}  # the pre-flight's findings

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

    @property
    def small(self) -> bool:
        """``--quick`` on a CPU (CI): what needs four ranks on a GPU runs on two here (each
        process costs the CI machine seconds of start-up; tests/multiproc covers four ranks)."""
        return self.args.quick and self.device == "cpu"

    def skip(self, name: str, reason: str) -> None:
        """Record a check that cannot run here, with the one line that says why."""
        print(f"== {name}\n   skipped: {reason}", flush=True)
        self.results.append({"check": name, "ok": None, "seconds": 0.0, "skipped": reason})

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
            _train_here(args)
            s = _summary(out)
            figures[regime] = {
                "device": s["ranks"][0]["device"],
                "steps": [m["num_steps"] for m in s["modules"]],
                "test_accuracy": s["best_test_accuracy"],
            }
        ok = all(self.device in f["device"] and all(n > 0 for n in f["steps"]) for f in figures.values())
        return ok, figures

    def search(self) -> tuple[bool, dict[str, Any]]:
        """SEDONA's search (a few meta-steps, torch.func's nested gradients) on this device, and on
        a GPU the same search on the CPU beside it: α and β within float32 reordering of each other."""
        from trgl_pipe.config import load_config
        from trgl_pipe.search.loop import SearchOptions, run_search

        args = [*TINY, "data.train_size=256", "data.batch_size=32", "model.depth=14", "model.width=8"]
        args += ["aux.channels=32", "model.num_modules=3", "train.num_threads=1"]
        options = SearchOptions(budget=3, inner_steps=2, max_depth=2)
        records = {}
        for device in dict.fromkeys([self.device, "cpu"]):
            out = self.out(f"search-{device}.yaml")
            out.unlink(missing_ok=True)
            run_search(load_config(None, [*args, f"device={device}"]), options, out, ["gpu_check"])
            records[device] = json.loads(out.with_suffix(".json").read_text())
        here = records[self.device]
        figures: dict[str, Any] = {"device": here["device"], "split": here["decision"]["split"]}
        figures["wall_s"] = here["wall_s"]
        finite = all(math.isfinite(v) for row in here["alpha"] + here["beta"] for v in row)
        close = True
        if self.device != "cpu":

            def values(record: dict[str, Any]) -> list[float]:
                return [v for row in record["alpha"] + record["beta"] for v in row]

            pairs = zip(values(here), values(records["cpu"]), strict=True)
            figures["max_difference_to_cpu"] = max(abs(a - b) for a, b in pairs)
            close = figures["max_difference_to_cpu"] < 1e-3
        return finite and close and self.device in here["device"], figures

    # -- 2 -------------------------------------------------------------------------------------

    def equivalence(self) -> tuple[bool, dict[str, Any]]:
        k = 2 if self.small else 4
        return self._against_one_process("eq", [f"model.num_modules={k}"], k, k)

    def _against_one_process(
        self, tag: str, extra: list[str], nproc: int, modules: int
    ) -> tuple[bool, dict[str, Any]]:
        """A torchrun pipeline of ``nproc`` ranks against the one-process parallel regime on the
        same device, ``train.deterministic=true``: every step in both, per-step losses and final
        parameters equal, else the largest difference (a NaN or a missing step fails)."""
        common = [
            *TINY,
            f"device={self.device}",
            "data.train_size=300",
            "data.batch_size=64",
            "model.depth=14",
            "model.width=8",
            "train.epochs=2",
            "train.deterministic=true",
            "train.num_threads=1",
            "log.every_steps=1",
            "checkpoint.every_epochs=1",
            *extra,
        ]
        single, piped = self.out(f"{tag}-single"), self.out(f"{tag}-pipe")
        _run(trgl_cmd([*common, f"out_dir={single}"]), 600)
        _run(torchrun_cmd(nproc, [*common, f"out_dir={piped}", "pipeline.timeout_s=120"]), 900)

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
        for k in range(modules):
            fa = sorted((single / "checkpoints").iterdir())[-1] / f"module-{k}.pt"
            fb = sorted((piped / "checkpoints").iterdir())[-1] / f"module-{k}.pt"
            sa = torch.load(fa, weights_only=True)["stage"]
            sb = torch.load(fb, weights_only=True)["stage"]
            for part in [p for p in ("body", "head", "aux") if p in sa]:
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
        complete = len(a) == modules * 10 and compared["num_missing"] == 0
        return complete and (bitwise or loss_gap < 1e-4) and not math.isnan(param_gap), figures

    # -- 3 -------------------------------------------------------------------------------------

    def throughput(self) -> tuple[bool, dict[str, Any]]:
        quick = self.args.quick
        models = throughput_models(quick)
        steps, skip = throughput_steps(quick)
        repeats = 1 if quick else 2
        figures: dict[str, Any] = {}
        ok = True
        for name, model in models.items():
            batch = int(next(o for o in model if o.startswith("data.batch_size")).split("=")[1])
            base = throughput_args(model, self.device, steps)
            # the CPU mode runs the code, not the speed: 4 ranks would repeat the 2-rank path
            cpu_quick = quick and self.device == "cpu"
            variants = ["single", "2 ranks"] + ([] if self.small or cpu_quick else ["4 ranks"])
            rates: dict[str, list[float]] = {v: [] for v in variants}
            for rep in range(repeats):  # interleaved: the variants share the machine's drifts
                for variant in rates:
                    out = self.out(f"tp-{name}-{variant.replace(' ', '')}-{rep}")
                    if variant == "single" and quick and self.device == "cpu":
                        _train_here([*base, f"out_dir={out}"])  # the CPU mode: a process start less
                    elif variant == "single":
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
        steps, skip = (20, 8) if quick else (60, 20)
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
        variants = [("fp32", []), ("bf16", ["train.precision=bf16"])]
        if not self.small:  # tests/test_native_paths.py trains channels_last on the CPU
            variants.append(("channels_last", ["train.channels_last=true"]))
        if quick and self.device == "cpu":
            # a cold inductor compile costs about 45 s of the CI's two cores; tests/test_native_paths.py
            # compiles on the CPU already, so the CPU mode stops at the eager options
            figures["compile"] = {"skipped": "--quick on the CPU: tests/test_native_paths.py compiles there"}
        elif self.missing.get("compiler"):
            figures["compile"] = {"skipped": self.missing["compiler"]}
        else:
            # one cold compile: channels_last is what inductor picks for convolutions on a GPU anyway
            variants.append(("compile", ["train.compile=true", "train.channels_last=true"]))
        for name, extra in variants:
            out = self.out(f"speed-{name}")
            env = {
                **_env(1 if self.device == "cpu" else 4),
                "TORCHINDUCTOR_CACHE_DIR": str(self.work / "inductor"),
            }
            if quick and self.device == "cpu":  # the CPU mode only checks that the options run
                _train_here([*base, *extra, f"out_dir={out}"])
            else:
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
        ranks = 2 if self.small else 4
        out = self.out("killed")
        args = [
            *TINY,
            f"device={self.device}",
            "data.train_size=2000",
            "data.batch_size=64",
            "model.depth=14",
            f"model.num_modules={ranks}",
            "train.epochs=50",
            f"pipeline.timeout_s={timeout_s}",
            "debug.trace=true",
            f"out_dir={out}",
        ]
        victim_rank = ranks // 2  # a middle rank: both neighbours must notice (rank 1 of 2: its one)
        proc = subprocess.Popen(
            torchrun_cmd(ranks, args),
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        trace = out / f"trace.rank{ranks - 1}.jsonl"  # the last rank trains: every rank has started
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (trace.exists() and "TRAIN" in trace.read_text()):
            time.sleep(0.2)
        victim = None
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
                if rank == str(victim_rank) and "trgl_pipe.run" in " ".join(child.cmdline()):
                    victim = child.pid
            except psutil.Error:
                continue
        if victim is None:
            proc.kill()
            return False, {"error": f"rank {victim_rank} never started training"}
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=timeout_s + 120)
        elapsed = time.monotonic() - t0
        named = [line for line in stderr.splitlines() if line.startswith("error:")]
        return (proc.returncode != 0 and elapsed < timeout_s), {
            "ranks": ranks,
            "killed_rank": victim_rank,
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
            # K=2 x R=2 on four ranks; on two (CPU mode) each rank holds both modules
            *(["pipeline.modules_per_rank=2"] if self.small else []),
        ]
        _run(torchrun_cmd(2 if self.small else 4, args), 900)
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

    # -- 10-12: what needs two GPUs ----------------------------------------------------------------

    def two_gpu_pipeline(self) -> tuple[bool, dict[str, Any]]:
        """K = 2 on two GPUs (NCCL point-to-point) against one process."""
        ok, figures = self._against_one_process("nccl-k2", ["model.num_modules=2"], 2, 2)
        return ok and figures["data_backend"] == "nccl", figures

    def two_gpu_infopro(self) -> tuple[bool, dict[str, Any]]:
        """InfoPro at K = 4 on two GPUs: the image follows each batch from rank 0 to rank 1 over NCCL."""
        extra = ["model.num_modules=4", "pipeline.modules_per_rank=2", "objective.name=infopro"]
        ok, figures = self._against_one_process("nccl-infopro", extra, 2, 4)
        return ok and figures["data_backend"] == "nccl", figures

    def two_gpu_replicas(self) -> tuple[bool, dict[str, Any]]:
        """K = 2 modules on one rank, R = 2 replicas on two GPUs: DDP's all-reduce over NCCL."""
        out = self.out("nccl-replicas")
        args = [
            *TINY,
            "device=cuda",
            "data.train_size=256",
            "data.batch_size=64",
            "model.depth=14",
            "model.width=8",
            "model.num_modules=2",
            "pipeline.modules_per_rank=2",
            "pipeline.replicas=2",
            "train.epochs=1",
            "pipeline.timeout_s=120",
            f"out_dir={out}",
        ]
        _run(torchrun_cmd(2, args), 600)
        s = _summary(out)
        devices = [r["device"] for r in s["ranks"]]
        figures = {
            "data_backend": s.get("data_backend"),
            "ranks_devices": devices,
            "test_accuracy": s["best_test_accuracy"],
        }
        return s.get("data_backend") == "nccl" and len(set(devices)) == 2, figures


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


UNTESTABLE = (
    "What one GPU cannot test: NCCL point-to-point between two GPUs (the pipeline's activations "
    "when every rank has a GPU of its own), NCCL DDP between replicas on different GPUs, and "
    "several nodes. Here ranks share the GPU, so activations and gradients go through gloo; "
    "the multi_gpu group runs the first two where two GPUs are visible."
)
UNTESTABLE_TWO_GPUS = "What this machine cannot test: several nodes (NCCL across hosts)."


def untestable(results: list[dict[str, Any]]) -> str:
    """What this run could not reach: depends on whether the two-GPU checks ran."""
    ran = any(r["check"].startswith("two_gpu") and r["ok"] is not None for r in results)
    return UNTESTABLE_TWO_GPUS if ran else UNTESTABLE


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
        + (f"; skipped: {', '.join(skipped)}" if skipped else "")
    )
    lines.append(untestable(results))
    return lines


def render(payload: dict[str, Any]) -> str:
    title = "GPU acceptance run" if payload["device"] == "cuda" else "GPU acceptance run, CPU mode"
    lines = [
        *page_header(payload, title),
        markdown_table([{k: r[k] for k in ("check", "ok", "seconds")} for r in payload["checks"]]),
        "",
        untestable(payload["checks"]),
        "",
    ]
    for r in payload["checks"]:
        figures = {k: v for k, v in r.items() if k not in ("check", "ok", "seconds", "trace")}
        lines += [f"## {r['check']}", "", "```json", json.dumps(figures, indent=1)[:6000], "```", ""]
    return "\n".join(lines)


# What the GPU estimates assume (no GPU has run this script yet): one process start (import torch
# and torchvision, CUDA context, the data) 8 s; one torchrun start (agent, ranks, rendezvous,
# process groups) 15 s; a training step of these small models 50 ms; a cold inductor compile 90 s
# (a ResNet-20 module's cold compile took 45 s on the 2-core CPU). Each run records every check's
# real seconds beside its estimate, so the first GPU run corrects these.
PROCESS_S, TORCHRUN_S, STEP_S, COMPILE_S = 8, 15, 0.05, 90


@dataclass(frozen=True)
class Spec:
    """One check: its group (what ``--only`` runs together), what it needs, what it launches on a
    GPU (for its estimate), and its seconds measured in ``--device cpu --quick`` on 2 cores."""

    name: str
    group: str
    processes: int
    torchruns: int
    steps: int
    cpu_s: int
    compiles: int = 0
    needs: tuple[str, ...] = ()

    @property
    def gpu_s(self) -> int:
        """Estimated seconds on one H100 (see PROCESS_S)."""
        seconds = self.processes * PROCESS_S + self.torchruns * TORCHRUN_S
        return round(seconds + self.steps * STEP_S + self.compiles * COMPILE_S)


SPECS = (
    Spec("regimes", "correctness", 1, 0, 4 * 6, 10),  # in this process: one start's worth of set-up
    Spec("search", "correctness", 0, 0, 3 * 3 * 2, 5),  # in this process: 3 meta-steps, twice on a GPU
    Spec("equivalence", "correctness", 1, 1, 2 * 40, 18, needs=("torchrun",)),
    Spec("sigkill", "correctness", 0, 1, 20, 13, needs=("torchrun",)),
    Spec("replicas", "correctness", 0, 1, 2 * 4, 11, needs=("torchrun",)),
    Spec("throughput", "speed", 2, 4, 6 * 80, 24, needs=("torchrun",)),
    Spec("speed_options", "speed", 4, 0, 4 * 60, 17, compiles=1),
    Spec("memory", "memory", 1, 0, 35 * 2, 12),  # in this process: 35 ranks and runs, 2 steps each
    Spec("nccl", "cuda", 1, 0, 0, 0, needs=("cuda",)),
    Spec("host_syncs", "cuda", 1, 0, 10, 0, needs=("cuda",)),
    Spec("two_gpu_pipeline", "multi_gpu", 1, 1, 2 * 20, 0, needs=("cuda", "torchrun", "two_gpus")),
    Spec("two_gpu_infopro", "multi_gpu", 1, 1, 2 * 40, 0, needs=("cuda", "torchrun", "two_gpus")),
    Spec("two_gpu_replicas", "multi_gpu", 0, 1, 8, 0, needs=("cuda", "torchrun", "two_gpus")),
)
GROUPS = {spec.group for spec in SPECS}


def select(only: list[str] | None) -> list[Spec]:
    """The checks ``--only`` names (check or group names), in their fixed order; all by default."""
    if not only:
        return list(SPECS)
    known = {s.name for s in SPECS} | GROUPS
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ValueError(
            f"--only {' '.join(unknown)}: not a check or group; "
            f"groups: {', '.join(sorted(GROUPS))}; checks: {', '.join(s.name for s in SPECS)}"
        )
    return [s for s in SPECS if s.name in only or s.group in only]


def preflight(device: str) -> dict[str, str | None]:
    """What the checks need, looked up before any starts: each need maps to None when present,
    else to the one line that says what is missing (the checks needing it are skipped)."""
    import importlib.util
    import shutil
    import socket
    import sysconfig

    missing: dict[str, str | None] = {"cuda": None, "torchrun": None, "compiler": None, "two_gpus": None}
    if device != "cuda":
        missing["cuda"] = "needs a CUDA GPU"
    if importlib.util.find_spec("torchvision") is None:
        missing["torchvision"] = "torchvision is not installed (the memory check's backbones need it)"
    try:  # torchrun --standalone binds its rendezvous to this host's name
        socket.getaddrinfo(socket.gethostname(), None)
    except OSError as error:
        missing["torchrun"] = f"this host's name {socket.gethostname()!r} does not resolve ({error})"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if compiler is None or not headers.exists():
        what = "no C compiler" if compiler is None else f"no Python headers ({headers})"
        missing["compiler"] = f"{what}: torch.compile cannot build kernels"
    if device != "cuda" or torch.cuda.device_count() < 2:
        missing["two_gpus"] = "needs two or more visible GPUs"
    return missing


def plan_lines(specs: list[Spec], device: str, quick: bool, missing: dict[str, str | None]) -> list[str]:
    """The checks about to run, each with its estimated seconds, and what is skipped and why."""
    lines, total = [], 0
    for spec in specs:
        reason = next((missing[n] for n in spec.needs if missing.get(n)), None)
        seconds = spec.cpu_s if device == "cpu" else spec.gpu_s
        if reason is None:
            total += seconds
        state = f"skipped: {reason}" if reason else f"~{seconds} s"
        lines.append(f"  {spec.group:<12} {spec.name:<18} {state}")
    basis = "measured on a 2-core CPU" if device == "cpu" else "estimated for one H100, not measured"
    lines.append(f"  total about {total / 60:.1f} min ({basis})")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer repeats (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help=f"run only these checks or groups ({', '.join(sorted(GROUPS))})",
    )
    parser.add_argument("--plan", action="store_true", help="print the plan and the pre-flight, run nothing")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU; use --device cpu --quick", file=sys.stderr)
        return 2
    try:
        specs = select(args.only)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {args.device}, "
        f"{torch.cuda.device_count()} GPU(s)",
        flush=True,
    )
    missing = preflight(args.device)
    print("plan:", *plan_lines(specs, args.device, args.quick, missing), sep="\n", flush=True)
    if args.plan:
        return 0
    name = "gpu_check" if args.device == "cuda" else "gpu_check_cpu"
    if args.only:
        name += "_" + "_".join(args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "benchmark": "gpu_check",
        "device": args.device,
        "quick": args.quick,
        "only": args.only,
        "command": command(),
        "machine": machine(),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        },
        "preflight": {k: v for k, v in missing.items() if v},
        "checks": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        check = Check(args, Path(tmp))
        check.missing = missing
        for spec in specs:
            reason = next((missing[n] for n in spec.needs if missing.get(n)), None)
            if reason is not None:
                check.skip(spec.name, reason)
            else:
                check.run(spec.name, getattr(check, spec.name))
            check.results[-1]["estimated_s"] = spec.cpu_s if args.device == "cpu" else spec.gpu_s
            payload["checks"] = check.results
            _write(args.out, name, payload)  # after every check: a later crash or kill keeps these
    print("\n".join(["", "== verdict", *verdict(check.results)]), flush=True)
    failed = [r["check"] for r in check.results if r["ok"] is False]
    return 1 if failed else 0


def _write(out: Path, name: str, payload: dict[str, Any]) -> None:
    """Both result files, each replaced whole (a reader never sees half of one)."""
    for suffix, text in ((".json", json.dumps(payload, indent=2) + "\n"), (".md", render(payload))):
        tmp = out / f".{name}{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(out / f"{name}{suffix}")


if __name__ == "__main__":
    sys.exit(main())
