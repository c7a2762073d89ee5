"""Shared fixtures: tiny configs on the embedded Fashion-MNIST subset, fixed seeds."""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from trgl_pipe.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]

# A network and data small enough that a whole run takes seconds on one CPU core:
# 300 training images in batches of 64 leave a last partial batch of 44.
TINY = [
    "data.source=embedded",
    "data.train_size=300",
    "data.val_size=100",
    "data.test_size=200",
    "data.batch_size=64",
    "data.eval_batch_size=100",
    "model.depth=14",
    "model.width=4",
    "model.num_modules=2",
    "train.epochs=2",
    "train.num_threads=1",
    "trgl.tau=10000",
    "log.live=off",
    "log.every_steps=1",
    "checkpoint.every_epochs=1",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest tests (``heavy(seconds)``, seconds measured in CI) first, longest first: with two
    workers a long test started last leaves the other worker idle at the end (longest-processing-
    time-first scheduling); the rest keep their order (the sort is stable)."""

    def seconds(item: pytest.Item) -> float:
        heavy = item.get_closest_marker("heavy")
        return heavy.args[0] if heavy is not None else 0.0

    items.sort(key=lambda item: -seconds(item))


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny(tmp_path: Path):
    """``tiny("model.num_modules=3", ...)`` -> a Config writing into a fresh folder."""
    counter = iter(range(1000))

    def make(*overrides: str) -> Config:
        out = tmp_path / f"run{next(counter)}"
        return load_config(None, [*TINY, f"out_dir={out}", *overrides])

    return make


def assert_same_final_states(
    a: str | Path, b: str | Path, parts: tuple[str, ...] = ("body", "head", "aux")
) -> None:
    """Two finished runs ended with equal weights, bit for bit, in every module and part."""
    first, second = final_stage_states(a), final_stage_states(b)
    assert first.keys() == second.keys()
    for k in first:
        for part in parts:
            for name, tensor in first[k].get(part, {}).items():
                assert torch.equal(tensor, second[k][part][name]), (k, part, name)


def train_losses(out_dir: str | Path) -> dict[tuple[int, int], float]:
    """(module, step) -> the loss a finished run logged (log.every_steps of TINY is 1)."""
    from trgl_pipe.watch.metrics import read_metrics

    return {
        (e["module"], e["step"]): e["loss"]
        for e in read_metrics(Path(out_dir) / "metrics.jsonl")
        if e["event"] == "train"
    }


def final_stage_states(out_dir: str | Path) -> dict[int, dict]:
    """Each module's stage state in a finished run's final checkpoint (the run must have ended)."""
    from trgl_pipe.folder.checkpoint import latest_complete

    folder = latest_complete(out_dir)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["progress"]["final"]
    return {
        k: torch.load(folder / f"module-{k}.pt", weights_only=True)["stage"]
        for k in range(meta["num_modules"])
    }


def cli_args(*overrides: str) -> list[str]:
    return [*TINY, *overrides]


def run_cli(args: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python -m trgl_pipe.run ARGS`` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "trgl_pipe.run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        **kwargs,
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to show a refused command changed nothing)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


_PORTS = itertools.count()


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999), from a block of this xdist worker's
    own. A port the OS hands out (bind to 0) may be handed out again before torchrun binds it:
    gloo's connections in the other worker's ranks take ephemeral ports all the time (it failed a
    CI run with EADDRINUSE). Below that range only these tests pick ports, each worker its own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    base = 20000 + 1000 * (int(worker) if worker.isdigit() else 0) % 12000
    for _ in range(1000):
        port = base + next(_PORTS) % 1000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {base}-{base + 999}")


def torchrun_cmd(
    nproc: int,
    args: list[str],
    launcher: str = "torch.distributed.run",
    target: tuple[str, ...] = ("-m", "trgl_pipe.run"),
    forked: bool = False,
) -> list[str]:
    """A one-host launch of ``target`` on ``nproc`` ranks (torchrun, or trgl_pipe's own launcher).
    ``forked``: the launcher and its ranks are forks of this session's fork server (see
    tests/forkserver.py; for launches whose test does not look at the process tree)."""
    via = [str(FORKSERVER)] if forked else []
    return [
        sys.executable,
        *via,
        "-m",
        launcher,
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "--monitor-interval=0.2",
        *via,
        *target,
        *args,
    ]


# The environment of every torchrun these tests start (one thread per rank)
TORCHRUN_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
FORKSERVER = ROOT / "tests" / "forkserver.py"
_forkserver: list[subprocess.Popen] = []


def forkserver_env(extra: dict[str, str]) -> dict[str, str]:
    """``os.environ`` with ``extra`` and the address of this session's fork server, started on first
    use in the environment of the tests' torchruns (``TORCHRUN_ENV``): a request whose environment
    differs from that runs a fresh interpreter. ``TRGL_TEST_FORKSERVER=off`` runs every process
    as a fresh interpreter."""
    from forkserver import ADDRESS

    env = {**os.environ, **extra}
    if env.get(ADDRESS) == "off":  # every process a fresh interpreter (to compare, or to debug)
        return {k: v for k, v in env.items() if k != ADDRESS}
    if not _forkserver:
        address = str(Path(tempfile.mkdtemp(prefix="trgl-forkserver-")) / "socket")
        server = subprocess.Popen(
            [sys.executable, str(FORKSERVER), "--serve", address],
            cwd=ROOT,
            env={**os.environ, **TORCHRUN_ENV, ADDRESS: address},
        )
        _forkserver.append(server)
        atexit.register(shutil.rmtree, Path(address).parent, ignore_errors=True)
        atexit.register(server.terminate)  # (atexit runs the last registered first)
        deadline = time.monotonic() + 120
        while not Path(address).exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # until it has imported torch; a launch before that runs unforked
    env[ADDRESS] = _forkserver[0].args[-1]
    return env


def start_torchrun(nproc: int, args: list[str], *launcher_options: str) -> subprocess.Popen:
    """torchrun in the background (through the fork server), its output piped: for tests that
    signal a rank (:func:`rank_process` finds it)."""
    cmd = torchrun_cmd(nproc, args, forked=True)
    cmd[4:4] = launcher_options  # after python, the client, -m torch.distributed.run
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=forkserver_env(TORCHRUN_ENV),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def rank_processes(launcher: psutil.Process) -> dict[int, list[psutil.Process]]:
    """Each rank of a running launch: the process torchrun started for it (RANK in its
    environment) and, for a fork server's client, the fork that does the rank's work (a forked
    launcher's ranks are children of its fork)."""
    from forkserver import fork_of

    def with_fork(process: psutil.Process) -> list[psutil.Process]:
        fork = fork_of(_forkserver[0].args[-1], process.pid) if _forkserver else None
        return [process] if fork is None else [process, psutil.Process(fork)]

    ranks: dict[int, list[psutil.Process]] = {}
    for root in with_fork(launcher):
        for child in root.children(recursive=True):
            try:
                rank = child.environ().get("RANK")
                if rank is not None and "trgl_pipe.run" in " ".join(child.cmdline()):
                    ranks.setdefault(int(rank), []).extend(with_fork(child))
            except psutil.Error:
                continue
    return ranks


def rank_process(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    """The process that computes rank ``rank`` of a running launch (a fork, or torchrun's child)."""
    found = rank_processes(launcher).get(rank)
    return found[-1] if found else None


def run_torchrun(nproc: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_cmd(nproc, args, forked=True),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=forkserver_env(TORCHRUN_ENV),
    )


def run_here(args: list[str], capsys: pytest.CaptureFixture) -> subprocess.CompletedProcess:
    """``python -m trgl_pipe.run ARGS`` in this test's own process (a start of torch fewer than
    ``run_cli``): its exit code and what it printed. For runs that refuse or train on the CPU
    alone; a run through fragile native code (compile, oneDNN's bf16) keeps a process of its own."""
    from trgl_pipe.run import main

    capsys.readouterr()  # what came before is not this run's
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        code = main(args)
    except SystemExit as stop:  # argparse
        code = stop.code if isinstance(stop.code, int) else 2
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def train_here(overrides: list[str]) -> None:
    """A one-process run in this test's own process: the reference a pipeline is compared with,
    without the 2-3 s start of another Python with torch that ``run_cli`` costs."""
    from trgl_pipe.config import load_config
    from trgl_pipe.training.single import run_single

    run_single(load_config(None, overrides), console_summary=False)


def run_as_rank_0(world_size: int, args: list[str]) -> subprocess.CompletedProcess:
    """``python -m trgl_pipe.run ARGS`` as rank 0 of ``world_size`` ranks, without the others: for
    launches refused before any process group exists (a torchrun of N ranks would cost N starts of
    torch to print the same line; tests/multiproc/test_pipeline.py checks one such refusal through
    torchrun, its exit code and its single line)."""
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    return run_cli(args, env=env)


def make_tiny_imagenet(root: Path, wnids=("n01443537", "n01629819", "n01641577"), per_class=4, val=2) -> Path:
    """A small TinyImageNet in its distributed layout (64x64 JPEGs, one grayscale)."""
    from PIL import Image

    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)  # unlabelled: ignored
    (root / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tsomething {i}\n" for i, w in enumerate(wnids)))
    annotations = []
    for c, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        boxes = []
        for i in range(per_class):
            pixels = np.full((64, 64, 3), 40 * c + i, dtype=np.uint8)
            image = Image.fromarray(pixels) if (c, i) != (0, 0) else Image.fromarray(pixels[:, :, 0])
            image.save(folder / f"{wnid}_{i}.JPEG", quality=95)
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
        for i in range(val):
            name = f"val_{c * val + i}.JPEG"
            Image.fromarray(np.full((64, 64, 3), 40 * c, dtype=np.uint8)).save(root / "val" / "images" / name)
            annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return root


def run_ranks(script: str, nproc: int, args: list[str], timeout: float = 60) -> list[str]:
    """``python -c script args`` as ranks 0..nproc-1 of one job (RANK, WORLD_SIZE, MASTER_*);
    returns each rank's stdout, failing the test if one fails or they hang."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script, *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"the {nproc} ranks hung")
        assert proc.returncode == 0, err[-2000:]
        outputs.append(out)
    return outputs
