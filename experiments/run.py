"""Run the result experiments of docs/results.md, one command each; finished runs are skipped.

    python experiments/run.py tau-sweep          # 0: the τ range on a subset (K=16)
    python experiments/run.py depth              # 1: E2E vs parallel VanGL/TRGL at K = 2, 4, 8, 16
    python experiments/run.py tau-full           # 1b: the τ range on the full data at K = 4 and 16
    python experiments/run.py blockwise          # 2: sequential / multi-lap / parallel, block-wise
    python experiments/run.py pipeline           # 4: one setting through the torchrun pipeline
    python experiments/run.py scarce-sweep       # 5a: τ of TRGL-halves on 5,000 images (tuning seed)
    python experiments/run.py scarce             # 5: E2E / VanGL / TRGL-halves at K = 2..16, 5,000 images
    python experiments/run.py authors            # 6: the authors' knobs against trgl_pipe's defaults
    python experiments/run.py competitors        # 7: InfoPro, PredSim, DGL in experiment 5's setting
    python experiments/run.py quickstart         # 8: the quickstart: TRGL (fp32, bf16 wire), VanGL
    python experiments/run.py sedona             # 9: SEDONA's searched cut against depth and balanced, K = 4
    python experiments/run.py man                # 10: what MAN's staleness costs (N = 1, 10, 50), K = 4
    python experiments/run.py fair-sweep         # 11a: every method's knob, 5 values, K = 16, tuning seed
    python experiments/run.py all --dry-run      # print the commands only
    python experiments/run.py blockwise --only '*-tenth' --max-seeds 1   # a part of one
    python experiments/run.py competitors --only '*-k16' --seeds 2         # one seed of some runs

Each run writes ``experiments/runs/<experiment>/<name>-s<seed>/`` (config.yaml, metrics.jsonl,
summary.json; checkpoints are not kept). A folder without summary.json is an interrupted attempt
and starts again, unless another process holds its lock (it is running): then it is skipped, so
several invocations can share one experiment's list of runs. Then ``python experiments/reports.py``
rebuilds the reports under docs/results/ from the run folders.
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trgl_pipe.folder.run_folder import held_by

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "experiments" / "runs"

# Full Fashion-MNIST from Debian's dataset-fashion-mnist (60k/10k; 5k of train held out).
FULL = [
    "data.name=fashion_mnist",
    "data.source=debian",
    "data.val_size=5000",
    "data.batch_size=128",
    "data.eval_batch_size=1000",
    "optim.lr=0.1",
    "optim.schedule=cosine",
    "log.every_steps=50",
    "log.live=off",
    "checkpoint.every_epochs=0",
    "train.num_threads=2",
]

# Experiment 1: ResNet-38 (18 blocks, enough for 16 modules), width 8.
DEPTH_NET = ["model.depth=38", "model.width=8", "train.epochs=2", "train.eval_every_epochs=1"]
TAU = "1e4"  # the best of the τ sweep (experiments/runs/tau-sweep), see docs/results.md


# Experiment 5: data-scarce (the paper's STL-10 setting: few images per class, deep K): 5,000
# class-balanced training images, the full 10k test set, ResNet-38 (18 blocks, so K=16 has one or
# two blocks per module), trained until the modules overfit; one thread per run.
SCARCE = [
    *FULL,
    "data.train_size=5000",
    "data.class_balanced=true",
    "model.depth=38",
    "model.width=8",
    "train.epochs=30",
    "train.eval_every_epochs=5",
    "train.num_threads=1",
    "log.every_steps=40",
]
SCARCE_TUNING_SEED = 100  # the τ sweep's seed; the comparison uses fresh seeds 0, 1, 2
SCARCE_TAUS = ("1e3", "3e3", "1e4", "3e4", "1e5")
SCARCE_TAU: str | None = "1e4"  # the best validation accuracy of scarce-sweep (seed 100): docs/results.md


# Experiment 7: the paper's competitors in experiment 5's setting (5,000 images, ResNet-38 width 8,
# 30 epochs, fresh seeds 0-2), beside the committed VanGL and TRGL runs of experiments/runs/scarce.
# Hyper-parameters from each method's paper: InfoPro's per-module weights are the authors' ResNet-110
# commands for K (objective.kwargs.weights=null), temperature 0.07, their "1c2f" head; PredSim's
# β = 0.99; DGL is VanGL with DGL's MLP-SR head. The optimizer and schedule are experiment 5's for
# every method (equal terms), not each paper's own.
COMPETITORS = {
    "infopro-softmax": ["objective.name=infopro", "objective.kwargs.loss=softmax"],
    "infopro-contrast": ["objective.name=infopro", "objective.kwargs.loss=contrast"],
    "predsim": ["objective.name=predsim", "objective.kwargs.beta=0.99"],
    "dgl-mlp-sr": ["objective.name=vangl", "aux.type=dgl_mlp_sr"],
}
COMPETITOR_KS = (4, 16)


# Experiment 9: SEDONA's search in experiment 5's setting at K = 4. The search runs once on the
# tuning seed (its cost is recorded in search.json); VanGL with SEDONA's heads then trains on the
# searched split and depths, on the searched split with depth-2 heads, and on the depth and
# balanced splits with SEDONA's heads at depth 2, on fresh seeds 0-2. The heads' last 1x1 conv
# is 128 wide (SEDONA's 512 is for 16-channel networks, and more memory than the search's
# unrolled steps fit in 24 GiB at width 8).
SEDONA_HEAD = ["trgl.enabled=false", "aux.type=sedona", "aux.channels=128"]
SEDONA_NET = [*SCARCE, "model.num_modules=4", *SEDONA_HEAD]
SEDONA_SEARCH = "experiments/runs/sedona/search.yaml"
SEDONA_SEARCH_OPTIONS = ["--budget", "120", "--inner-steps", "2", "--batch-size", "32"]
# model.split=balanced measured on this machine with these heads (time, three measurements alike)
SEDONA_BALANCED = "model.split=[1,3,7]"


# Experiment 10: what MAN's staleness costs. MAN's module k takes module k+1's first block every
# N steps (objective.kwargs.every): N = 1 is the official schedule, 10 and 50 send 10x and 50x
# fewer weights. Experiment 5's setting at K = 4 but 10 epochs (CPU time), seeds 0-2, and
# VanGL beside it; MAN's defaults otherwise (m = 0.995, λ = (5, 0.5) at every module, 2c2f head).
MAN_NET = [*SCARCE, "model.num_modules=4", "train.epochs=10", "train.eval_every_epochs=5"]
MAN_EVERY = (1, 10, 50)


# Experiment 11: a comparison fair to every method (issue 34), step 1: the same tuning budget.
# Each method's main knob over 5 values (as many as TRGL's tau had in experiment 5a), in experiment
# 5's setting at K = 16 on its tuning seed (100, never reused); the value with the best module's
# validation accuracy is then run on fresh seeds 0-2 at K = 4 and 16 (step 2, once chosen).
# InfoPro: the contrastive loss and the authors' own weight vectors [λ1, λ2, λ1', λ2'] as the five
# values: their STL-10 commands for K = 2, 4, 8, 16 and their CIFAR-10 one for K = 16 (experiment
# 7 used the CIFAR-10 vectors). PredSim: β under its paper's optimizer (the authors' train.py
# defaults: Adam, lr 5e-4, no weight decay, lr × 0.25 at 50/75/89/94% of training), since under
# SGD the (1 − β) scaling divides the last module's rate by 100. AugLocal: d. MAN: λ1 (the
# reconstruction weight, λ2 = 0.5 as its default). HPFF: the cascade's share w (local 1 − w; its
# weights [5, 0.5, 1, 0.1], so module K-2 has a cascade too). DGL has no knob in the list
# and VanGL none: their experiment-7 and experiment-5 runs stand.
FAIR_TUNING_SEED = SCARCE_TUNING_SEED
PREDSIM_OPTIM = [
    "optim.name=adam",
    "optim.lr=5e-4",
    "optim.weight_decay=0",
    "optim.schedule=step",
    "optim.milestones=[0.5,0.75,0.89,0.94]",
    "optim.gamma=0.25",
]
INFOPRO_WEIGHTS = {
    "stl10k2": "[10, 1, 0, 0]",
    "stl10k4": "[20, 0.2, 5, 2]",
    "stl10k8": "[20, 0.2, 5, 1]",
    "stl10k16": "[20, 0.5, 10, 0.1]",
    "cifar10k16": "[5, 0, 0.5, 1]",
}
FAIR_SWEEP = {
    "infopro": [
        (f"w-{tag}", ["objective.name=infopro", f"objective.kwargs={{loss: contrast, weights: {w}}}"])
        for tag, w in INFOPRO_WEIGHTS.items()
    ],
    "predsim": [
        (f"beta{b}", ["objective.name=predsim", f"objective.kwargs={{beta: {b}}}", *PREDSIM_OPTIM])
        for b in ("0.9", "0.95", "0.99", "0.995", "0.999")
    ],
    "auglocal": [
        (f"d{d}", ["objective.name=auglocal", f"objective.kwargs={{depth: {d}}}"]) for d in range(1, 6)
    ],
    "man": [
        (f"lambda{w}", ["objective.name=man", f"objective.kwargs={{weights: [{w}, 0.5]}}"])
        for w in ("0", "1", "2.5", "5", "10")
    ],
    "hpff": [
        (
            f"w{w}",
            [
                "objective.name=hpff",
                f"objective.kwargs={{weights: [5, 0.5, 1, 0.1], cascade_weight: {w}, "
                f"local_weight: {1 - float(w):.4g}}}",
            ],
        )
        for w in ("0.5", "0.9", "0.99", "0.999", "0.9999")
    ],
}


def sedona_search() -> list[str]:
    """The search command of experiment 9 (seed: the tuning seed)."""
    return [
        sys.executable,
        "-m",
        "trgl_pipe.search",
        *SEDONA_NET,
        f"seed={SCARCE_TUNING_SEED}",
        "--out",
        SEDONA_SEARCH,
        *SEDONA_SEARCH_OPTIONS,
    ]


# Experiment 6: the authors' setup against trgl_pipe's defaults, one knob at a time: 10,000
# class-balanced images, ResNet-20 post-activation, K=4 (2/2/2/3 blocks), TRGL halves with the
# mean reduction (tau 0.5 for modules 0-1, 1 for 2-3 in both conventions), SGD 0.1 cosine, batch
# 128, 6 epochs, one thread.
AUTHORS_BASE = [
    *FULL,
    "data.train_size=10000",
    "data.class_balanced=true",
    "model.depth=20",
    "model.block=postact",
    "model.num_modules=4",
    "model.split=[2,4,6]",
    "trgl.reduction=mean",
    "trgl.tau_schedule=halves",
    "train.epochs=6",
    "train.eval_every_epochs=3",
    "train.num_threads=1",
]
OURS_TAU = ["trgl.halves_tau_of=first", "trgl.tau=0.5"]
KNOBS = {
    "init": ["model.init=orthogonal", "model.init_gain=0.05"],
    "shortcut": ["model.shortcut=pad"],
    # the authors' 1CNN head on every module, the last included; kernels 4, 4, 2, 2 bring the
    # 28, 14, 7, 7-pixel maps to 7, 3, 3, 3 (their STL-10 kernels 16, 16, 8, 8 do 96, 48, 24 -> 6, 3, 3)
    "heads": ["aux.last=aux", "aux.pool_kernel=[4,4,2,2]"],
}
AUTHORS_ALL = [
    *KNOBS["init"],
    *KNOBS["shortcut"],
    *KNOBS["heads"],
    "optim.weight_decay=2e-4",  # the authors' default
    "trgl.halves_tau_of=second",
    "trgl.tau=1.0",  # their convention: the same tau_k as OURS_TAU
]


# configs/quickstart.yaml as overrides (ResNet-20 width 16, K = 4, 6 epochs, TRGL τ = 1e5), one thread
QUICKSTART = [
    "data.name=fashion_mnist",
    "data.source=embedded",
    "data.val_size=1000",
    "data.batch_size=128",
    "data.eval_batch_size=500",
    "model.depth=20",
    "model.width=16",
    "model.num_modules=4",
    "train.epochs=6",
    "optim.lr=0.1",
    "optim.schedule=cosine",
    "trgl.tau=1e5",
    "train.num_threads=1",
    "log.live=off",
]


def experiment(name: str) -> list[tuple[str, list[str], list[int]]]:
    """(run name, overrides, seeds) of an experiment."""
    if name == "tau-sweep":
        base = [*FULL, *DEPTH_NET, "model.num_modules=16", "data.train_size=10000", "train.epochs=3"]
        runs = [("vangl-k16", [*base, "trgl.enabled=false"], [0])]
        runs += [
            (f"trgl-tau{t}-k16", [*base, f"trgl.tau={t}"], [0])
            for t in ("1e3", "3e3", "1e4", "3e4", "1e5", "3e5")
        ]
        return runs
    if name == "tau-full":  # the τ range again on the full data, where τ=1e4 did not help at K=4
        runs = []
        for k in (4, 16):
            net = [*FULL, *DEPTH_NET, f"model.num_modules={k}"]
            runs += [
                (f"trgl-tau{t}-k{k}", [*net, f"trgl.tau={t}"], [0, 1]) for t in ("3e3", "3e4", "1e5", "3e5")
            ]
        return runs
    if name == "depth":
        seeds = [0, 1, 2]
        runs = [("e2e", [*FULL, *DEPTH_NET, "train.regime=e2e", "trgl.enabled=false"], seeds)]
        for k in (2, 4, 8, 16):
            net = [*FULL, *DEPTH_NET, f"model.num_modules={k}"]
            runs.append((f"vangl-k{k}", [*net, "trgl.enabled=false"], seeds))
            runs.append((f"trgl-k{k}", [*net, f"trgl.tau={TAU}"], seeds))
        lam = float(TAU) * 2
        runs.append(
            (
                "trgl-adaptive-k16",
                [
                    *FULL,
                    *DEPTH_NET,
                    "model.num_modules=16",
                    "trgl.tau_schedule=adaptive",
                    f"trgl.lambda_init={lam:g}",
                    f"trgl.h={lam / 10:g}",
                    "trgl.s=50",
                ],
                seeds,
            )
        )
        return runs
    if name == "blockwise":
        seeds = [0, 1]
        runs = []
        for fraction, size in (("all", None), ("half", 27500), ("quarter", 13750), ("tenth", 5500)):
            sized = [*FULL, "model.depth=20", "model.width=8", "model.num_modules=9"]
            if size:
                sized.append(f"data.train_size={size}")
            for method, extra in (("vangl", ["trgl.enabled=false"]), ("trgl", [f"trgl.tau={TAU}"])):
                runs.append(
                    (
                        f"seq-{method}-{fraction}",
                        [*sized, *extra, "train.regime=sequential", "train.epochs=2"],
                        seeds,
                    )
                )
                runs.append(
                    (
                        f"mls-{method}-{fraction}",
                        [*sized, *extra, "train.regime=multilap", "train.epochs=2", "train.laps=2"],
                        seeds,
                    )
                )
                runs.append(
                    (
                        f"par-{method}-{fraction}",
                        [*sized, *extra, "train.regime=parallel", "train.epochs=2"],
                        seeds,
                    )
                )
            runs.append(
                (
                    f"e2e-{fraction}",
                    [*sized, "train.regime=e2e", "trgl.enabled=false", "train.epochs=2"],
                    seeds,
                )
            )
        return runs
    if name == "scarce-sweep":
        net = [*SCARCE, "model.num_modules=16"]
        runs = [("vangl-k16", [*net, "trgl.enabled=false"], [SCARCE_TUNING_SEED])]
        runs += [
            (
                f"trgl-halves-tau{t}-k16",
                [*net, "trgl.tau_schedule=halves", f"trgl.tau={t}"],
                [SCARCE_TUNING_SEED],
            )
            for t in SCARCE_TAUS
        ]
        return runs
    if name == "scarce":
        if SCARCE_TAU is None:
            raise SystemExit("set SCARCE_TAU from the scarce-sweep results first")
        seeds = [0, 1, 2]
        runs = [("e2e", [*SCARCE, "train.regime=e2e", "trgl.enabled=false"], seeds)]
        for k in (2, 4, 8, 16):
            net = [*SCARCE, f"model.num_modules={k}"]
            runs.append((f"vangl-k{k}", [*net, "trgl.enabled=false"], seeds))
            runs.append(
                (f"trgl-halves-k{k}", [*net, "trgl.tau_schedule=halves", f"trgl.tau={SCARCE_TAU}"], seeds)
            )
        return runs
    if name == "competitors":
        return [
            (f"{method}-k{k}", [*SCARCE, f"model.num_modules={k}", *extra], [0, 1, 2])
            for k in COMPETITOR_KS
            for method, extra in COMPETITORS.items()
        ]
    if name == "fair-sweep":
        net = [*SCARCE, "model.num_modules=16"]
        return [
            (f"{method}-{tag}-k16", [*net, *extra], [FAIR_TUNING_SEED])
            for method, values in FAIR_SWEEP.items()
            for tag, extra in values
        ]
    if name == "man":
        runs = [("vangl-k4", [*MAN_NET, "trgl.enabled=false"], [0, 1, 2])]
        man = [*MAN_NET, "objective.name=man"]
        every = {n: f"objective.kwargs={{every: {n}}}" for n in MAN_EVERY}
        runs += [(f"man-every{n}-k4", [*man, every[n]], [0, 1, 2]) for n in MAN_EVERY]
        return runs
    if name == "authors":
        seeds = [0, 1, 2]
        runs = [
            ("defaults", [*AUTHORS_BASE, *OURS_TAU], seeds),
            ("authors", [*AUTHORS_BASE, *AUTHORS_ALL], seeds),
        ]
        runs += [
            (f"defaults+{knob}", [*AUTHORS_BASE, *OURS_TAU, *extra], seeds) for knob, extra in KNOBS.items()
        ]
        runs.append(("authors-vangl", [*AUTHORS_BASE, *AUTHORS_ALL, "trgl.enabled=false"], [0]))
        return runs
    if name == "quickstart":  # the quickstart's setting in one process: TRGL with float32 and with
        # bf16 activations between modules (pipeline.wire_dtype), and VanGL beside them
        return [
            ("trgl-fp32", QUICKSTART, [0, 1, 2]),
            ("trgl-bf16-wire", [*QUICKSTART, "pipeline.wire_dtype=bf16"], [0, 1, 2]),
            ("vangl", [*QUICKSTART, "trgl.enabled=false"], [0, 1, 2]),
        ]
    if name == "sedona":
        seeds = [0, 1, 2]
        return [
            ("searched-k4", [*SEDONA_NET, SEDONA_SEARCH], seeds),
            # the searched cuts with the baselines' heads: what the cuts do apart from the depths
            ("searched-cuts-k4", [*SEDONA_NET, SEDONA_SEARCH, "aux.depth=2"], seeds),
            ("depth-k4", [*SEDONA_NET, "aux.depth=2"], seeds),
            ("balanced-k4", [*SEDONA_NET, SEDONA_BALANCED, "aux.depth=2"], seeds),
        ]
    if name == "pipeline":
        net = [*FULL, *DEPTH_NET, "model.num_modules=4", f"trgl.tau={TAU}", "train.num_threads=1"]
        return [("single-k4-1thread", net, [0]), ("pipeline-k4", [*net, "pipeline.transport=dist"], [0])]
    raise SystemExit(f"unknown experiment {name}")


def command(exp: str, run: str, overrides: list[str], seed: int) -> list[str]:
    out = (RUNS / exp / f"{run}-s{seed}").relative_to(ROOT)  # recorded relative to the checkout
    args = [*overrides, f"seed={seed}", f"out_dir={out}"]
    if "pipeline.transport=dist" in overrides:
        k = next(int(o.split("=")[1]) for o in overrides if o.startswith("model.num_modules="))
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={k}",
            "-m",
            "trgl_pipe.run",
            *args,
        ]
    return [sys.executable, "-m", "trgl_pipe.run", *args]


def claim_run(out: Path) -> int | None:
    """An exclusive lock on ``out``'s claim (a file in the temporary directory, so the checkout
    stays clean), held until the descriptor is closed or the process ends; None if another
    invocation holds it. The run's own lock is taken only once its process has started."""
    folder = Path(tempfile.gettempdir()) / "trgl-experiments"
    folder.mkdir(exist_ok=True)
    name = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
    fd = os.open(folder / f"{name}.claim", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument(
        "--only", nargs="+", metavar="PATTERN", help="run names to run (glob), e.g. '*-tenth'"
    )
    parser.add_argument("--max-seeds", type=int, help="run only the first N seeds of each run")
    parser.add_argument("--seeds", type=int, nargs="+", help="run only these seeds of each run")
    args = parser.parse_args()
    names = (
        ["tau-sweep", "depth", "blockwise", "pipeline", "scarce-sweep", "scarce"]
        if args.experiments == ["all"]
        else args.experiments
    )
    for exp in names:
        for run, overrides, seeds in experiment(exp):
            if args.only and not any(fnmatch.fnmatch(run, pattern) for pattern in args.only):
                continue
            if SEDONA_SEARCH in overrides and not (ROOT / SEDONA_SEARCH).is_file():
                search = sedona_search()
                printable = " ".join(search).replace(sys.executable, "python")
                print(f"search  {printable}", flush=True)
                if args.dry_run:
                    continue
                resume = ["--resume"] if (ROOT / SEDONA_SEARCH).with_suffix(".state.pt").is_file() else []
                if subprocess.run([*search, *resume], cwd=ROOT).returncode != 0:
                    raise SystemExit(f"failed: {printable}")
            for seed in seeds[: args.max_seeds]:
                if args.seeds is not None and seed not in args.seeds:
                    continue
                out = RUNS / exp / f"{run}-s{seed}"
                cmd = command(exp, run, overrides, seed)
                printable = " ".join(cmd).replace(sys.executable, "python").replace(str(ROOT) + "/", "")
                if (out / "summary.json").is_file():
                    print(f"done    {out.relative_to(ROOT)}")
                    continue
                holder = held_by(out)
                if holder is not None:
                    print(f"running {out.relative_to(ROOT)} (held by {holder}): skipped", flush=True)
                    continue
                print(f"run     {printable}", flush=True)
                if args.dry_run:
                    continue
                claim = claim_run(out)  # two invocations must not start (or remove) the same run
                if claim is None or (out / "summary.json").is_file():
                    if claim is not None:
                        os.close(claim)
                    print(f"taken   {out.relative_to(ROOT)} by another invocation: skipped", flush=True)
                    continue
                if out.exists():  # an interrupted attempt: start it again
                    shutil.rmtree(out)
                t0 = time.time()
                env_threads = {"OMP_NUM_THREADS": "1"} if "pipeline.transport=dist" in overrides else {}
                result = subprocess.run(
                    cmd,
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    env={**os.environ, **env_threads},
                )
                if result.returncode != 0:
                    print(result.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"failed: {printable}")
                os.close(claim)
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
                summary = json.loads((out / "summary.json").read_text())
                print(
                    f"        best module {summary['best_module']}: "
                    f"test {100 * summary['best_test_accuracy']:.2f}% "
                    f"({time.time() - t0:.0f} s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
