"""The authors' code and a trgl_pipe preset, step for step, on the same tensors and weights.

    python experiments/parity_authors.py AUTHORS_CHECKOUT                  # 2 epochs, K = 4
    python experiments/parity_authors.py AUTHORS_CHECKOUT --schedule constant --init theirs
    python experiments/parity_authors.py AUTHORS_CHECKOUT --record tests/data/authors_trajectory.json
    python experiments/parity_authors.py AUTHORS_CHECKOUT --data fashion_mnist --train-size 480 \
        --val-size 250 --test-size 500 --batch-size 64 --lr 0.1 --epochs 6 --steps 8 \
        --schedule constant --seed 0 --json RESULTS/constant-s0.json   # benchmarks/vs_authors.md

AUTHORS_CHECKOUT is a clone of the authors' public code (the repository block-wise/module-wise:
``resnet110-{2,4,8,16}modules-stl10.py``, ``utils7.py``, ``dataloaders9.py``); it stays outside this
repository and nothing of it is copied here. Their script is imported as it is and its own
``experiment()`` runs: their model classes, initialisation, optimizers, LR schedulers, τ, loss and
training loop. Two things are handed to it: the data (their loader function is replaced by one
that returns trgl_pipe's batches of the preset, augmentation included, in trgl_pipe's order, epoch by
epoch), and, with ``--init ours``, the initial weights (trgl_pipe's, copied into their modules before
their first step). Python packages their script imports only for plots and analyses (scipy,
sklearn, torchsummary) are replaced by empty modules when they are not installed; the output says
which.

trgl_pipe then trains the preset (configs/authors/..., with the overrides printed) in-process from
the same initial weights (``model.init_state``), module after module on every batch as the
parallel regime does. Printed: per step and module both losses, both kinetic energies and the
largest absolute difference between their parameters and buffers and trgl_pipe's; then both test
accuracies per module after each epoch. ``--record`` writes the authors' per-step numbers (losses,
kinetic energies, parameter checksums), the commit and versions, as JSON: the trajectory the test
suite holds trgl_pipe to (tests/test_authors_trajectory.py). ``--json`` writes both codes' test
accuracy per module after every epoch and validation accuracy after the last, read by both rules
(trgl_pipe's: the module best on validation, its last test accuracy; the authors': the highest test
accuracy over epochs and modules), with how many steps had equal losses and parameter checksums;
experiments/parity_table.py makes the tables of benchmarks/vs_authors.md from those files.
``--schedule run-cosine`` trains trgl_pipe alone with its own cosine to 0 over the run, from the
same initial weights and batches (their code has no such schedule).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trgl_pipe.config import load_config  # noqa: E402
from trgl_pipe.context import build_context  # noqa: E402
from trgl_pipe.models.initial_state import save_initial_state  # noqa: E402
from trgl_pipe.watch.summary import best_module  # noqa: E402

# packages their utils7.py and scripts import for plots and analyses only
OPTIONAL = [
    "scipy",
    "scipy.spatial",
    "scipy.stats",
    "sklearn",
    "sklearn.mixture",
    "sklearn.neighbors",
    "torchsummary",
]


SCHEDULES = {
    "cosine": ["optim.schedule=cosine", "optim.schedule_steps=30000", "optim.min_lr=0.001"],  # -lrd 1
    "constant": ["optim.schedule=constant"],  # -lrd 0
    "run-cosine": ["optim.schedule=cosine", "optim.schedule_steps=null", "optim.min_lr=0"],  # trgl_pipe's
}


def overrides_for(args: argparse.Namespace) -> list[str]:
    """The preset's keys changed for a small fixed input (synthetic images or a class-balanced
    subset of Fashion-MNIST as 3×32×32, as many as asked)."""
    if args.data == "fashion_mnist":
        data = [
            "data.name=fashion_rgb32:fashion_mnist_rgb32",
            "data.class_balanced=true",
            f"data.val_size={args.val_size}",
        ]
    else:
        data = [
            "data.name=synthetic",
            "data.source=auto",
            "data.root=null",
            f"data.image_size={args.image_size}",
            "data.channels=3",
            "data.num_classes=10",
            f"data.val_size={args.val_size}",
        ]
    return [
        *data,
        f"data.train_size={args.train_size}",
        f"data.test_size={args.test_size}",
        f"data.batch_size={args.batch_size}",
        f"data.eval_batch_size={args.batch_size}",
        "data.num_workers=0",
        f"train.epochs={args.epochs}",
        f"train.num_threads={args.threads}",
        f"seed={args.seed}",
        f"optim.lr={args.lr:g}",
        *SCHEDULES[args.schedule],
    ]


def stub_missing(names: list[str]) -> list[str]:
    """Empty stand-ins for the modules in ``names`` that are not installed (their attributes are
    placeholders that fail if called); returns the names stubbed."""
    stubbed: list[str] = []
    for name in names:
        try:
            if name.rpartition(".")[0] in stubbed:
                raise ImportError(name)
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__path__ = []  # a package, so submodules can be stubbed under it
            module.__getattr__ = lambda attr, _n=name: _placeholder(_n, attr)  # type: ignore[attr-defined]
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            if parent in sys.modules:
                setattr(sys.modules[parent], child, module)
            stubbed.append(name)
    return stubbed


def _placeholder(module: str, attr: str) -> Any:
    if attr.startswith("__"):
        raise AttributeError(attr)

    def fail(*_: Any, **__: Any) -> Any:
        raise RuntimeError(f"{module}.{attr} is not installed (stubbed by parity_authors.py)")

    return fail


def import_script(checkout: Path, script: str) -> types.ModuleType:
    sys.path.insert(0, str(checkout))
    spec = importlib.util.spec_from_file_location("authors_script", checkout / script)
    if spec is None or spec.loader is None or not (checkout / script).is_file():
        raise SystemExit(f"error: {checkout / script} is not there; give the authors' checkout and --script")
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(io.StringIO()):
        spec.loader.exec_module(module)
    module.device = torch.device("cpu")  # their scripts set it under __main__ only
    return module


def checkout_commit(checkout: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


class EpochLoader:
    """trgl_pipe's training batches, epoch 0, 1, ... on successive iterations (their loop's view)."""

    def __init__(self, batches: Any) -> None:
        self.batches = batches
        self.epoch = 0

    def __iter__(self) -> Iterator:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return iter(list(self.batches.train_batches(epoch)))

    def __len__(self) -> int:
        return self.batches.steps_per_epoch


def pairs(theirs: nn.Module, body: nn.Module, head: nn.Module) -> list[tuple[str, str]]:
    """Their module's state_dict keys against trgl_pipe's body then head keys, in order, checked
    by shape (both list stem, blocks and head tensors in the same order)."""
    ours = [(f"body.{k}", v) for k, v in body.state_dict().items()]
    ours += [(f"head.{k}", v) for k, v in head.state_dict().items()]
    mine = list(theirs.state_dict().items())
    if len(mine) != len(ours) or any(a.shape != b.shape for (_, a), (_, b) in zip(mine, ours, strict=True)):
        raise SystemExit(
            f"error: their module has {len(mine)} tensors, trgl_pipe's {len(ours)}, or their shapes differ: "
            "not the same architecture (check --script against --preset)"
        )
    return [(a, b) for (a, _), (b, _) in zip(mine, ours, strict=True)]


def checksums(module: nn.Module) -> list[float]:
    """Float64 sum and sum of absolute values of every parameter and buffer (a fingerprint)."""
    values = [t.detach().double() for t in module.state_dict().values() if t.is_floating_point()]
    return [float(sum(v.sum() for v in values)), float(sum(v.abs().sum() for v in values))]


def run_theirs(script: types.ModuleType, args: argparse.Namespace, ctx: Any, our_init: list) -> dict:
    """Their experiment() on trgl_pipe's batches; per-step losses, states, and test accuracies."""
    record: dict[str, Any] = {
        "steps": [],
        "states": [],
        "test_accuracy": [],
        "val_accuracy": None,
        "initial": None,
        "final": None,
    }
    test = list(ctx.batches.eval_batches("test"))
    val = list(ctx.batches.eval_batches("val"))
    image_shape = (1, 3, args.image_size, args.image_size)

    def loaders(*_: Any, **__: Any) -> tuple:
        return EpochLoader(ctx.batches), test, test, image_shape, 10, None, None

    original_train = script.train_modulewise
    original_test = script.test_par

    def train_modulewise(traintype, modules, optimizers, schedulers, criterion, tra, taus, *rest):
        if our_init:
            for module, (body, head) in zip(modules, our_init, strict=True):
                ours = {
                    **{f"body.{k}": v for k, v in body.items()},
                    **{f"head.{k}": v for k, v in head.items()},
                }
                pairing = pairs(module, _Holder(body), _Holder(head))
                module.load_state_dict({a: ours[b].clone() for a, b in pairing})
        record["initial"] = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
        captured: dict[int, Any] = {}
        current = {"module": 0}

        def wrap_forward(i: int, module: nn.Module) -> None:
            forward = module.forward

            def capture(z):
                out = forward(z)
                if module.training:
                    current["module"] = i
                    captured[i] = {"rs": out[2]}
                return out

            module.forward = capture

        for i, module in enumerate(modules):
            wrap_forward(i, module)

        class Criterion(nn.Module):
            def forward(self, out, y):
                value = criterion(out, y)
                if torch.is_grad_enabled():
                    captured[current["module"]]["target"] = value.detach()
                return value

        def wrap_step(i: int, optimizer: torch.optim.Optimizer) -> None:
            step = optimizer.step

            def recorded_step(*a: Any, **kw: Any) -> Any:
                result = step(*a, **kw)
                c = captured[i]
                # their expression, on their tensors: the value their loss.backward() started from
                with torch.no_grad():
                    transport = sum([torch.mean(r**2) for r in c["rs"]])
                    loss = c["target"] + transport / (2 * taus[i]) if tra else c["target"]
                n = sum(1 for s in record["steps"] if s["module"] == i)
                record["steps"].append(
                    {
                        "step": n,
                        "module": i,
                        "ce": float(c["target"]),
                        "kinetic": float(transport),
                        "loss": float(loss),
                        "lr": optimizer.param_groups[0]["lr"],
                        "checksums": checksums(modules[i]),
                    }
                )
                if n < args.steps:
                    record["states"].append({k: v.clone() for k, v in modules[i].state_dict().items()})
                return result

            optimizer.step = recorded_step

        for i, optimizer in enumerate(optimizers):
            wrap_step(i, optimizer)
        result = original_train(traintype, modules, optimizers, schedulers, Criterion(), tra, taus, *rest)
        # after the last epoch: their test_par on the validation images (trgl_pipe's protocol
        # chooses the module there), and their final weights
        record["val_accuracy"] = original_test(modules, criterion, val)
        record["final"] = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
        return result

    def test_par(modules, criterion, loader):
        accuracies = original_test(modules, criterion, loader)
        record["test_accuracy"].append(accuracies)
        return accuracies

    script.dataloaders = loaders
    script.train_modulewise = train_modulewise
    script.test_par = test_par
    log = io.StringIO()
    with contextlib.redirect_stdout(log), warnings.catch_warnings():
        # the recording wrapper around optimizer.step makes torch warn about the call order
        warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")
        script.experiment(
            batchsize=args.batch_size,
            traintype="par",
            clname="1CNN",
            initname="orthogonal",
            initgain=0.1,
            optimizer="sgd",
            labelsmoothing=0.1,
            learningrate=args.lr,
            learningratedecay=int(args.schedule == "cosine"),
            beta1=0.9,
            beta2=0.999,
            transport=1,
            tau=args.tau,
            varyingtau=1,
            lambdaloss0=1,
            lambdaloss0type="increasing",
            lambdaloss0power=1,
            uzawatau=0,
            uzawasteps=0,
            nepochs0=args.epochs,
            nepochs1=50,
            nepochs2=10,
            nrounds=5,
            trainsize=None,
            valsize=None,
            testsize=None,
            seed=args.seed,
            experiments=False,
        )
    record["log"] = log.getvalue()
    return record


class _Holder(nn.Module):
    """A state_dict in a module's clothing, for :func:`pairs`."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *_: Any, **__: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self._state


def their_command(args: argparse.Namespace) -> str:
    lrd = " -lrd 1" if args.schedule == "cosine" else ""
    return (
        f"python3 {args.script} -trt par -bas {args.batch_size} -lbs 0.1 -lrt {args.lr:g} -ing 0.1 -tra 1 "
        f"-tau {args.tau:g} -vta 1 -ne0 {args.epochs} -see {args.seed}{lrd}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkout", type=Path, help="a clone of the authors' code (kept outside this repository)"
    )
    parser.add_argument("--script", default="resnet110-4modules-stl10.py")
    parser.add_argument("--preset", default="configs/authors/stl10_resnet110_k4.yaml")
    parser.add_argument("--tau", type=float, default=1.0, help="their -tau (the preset's trgl.tau)")
    parser.add_argument(
        "--schedule",
        choices=list(SCHEDULES),
        default="cosine",
        help="their -lrd 1 (cosine) or -lrd 0 (constant); run-cosine: trgl_pipe's cosine to 0 over the "
        "run, which their code has not (trgl_pipe alone is trained)",
    )
    parser.add_argument(
        "--init", choices=["ours", "theirs"], default="ours", help="whose initial weights both use"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--steps", type=int, default=40, help="steps per module whose parameters are compared"
    )
    parser.add_argument(
        "--data",
        choices=["synthetic", "fashion_mnist"],
        default="synthetic",
        help="fashion_mnist: a class-balanced subset of Fashion-MNIST as 3x32x32 "
        "(experiments/fashion_rgb32.py)",
    )
    parser.add_argument("--image-size", type=int, default=32, help="synthetic images' side")
    parser.add_argument("--batch-size", type=int, default=12, help="12: n of every residual is no power of 2")
    parser.add_argument(
        "--train-size", type=int, default=256, help="synthetic: val-size of them are held out for validation"
    )
    parser.add_argument("--val-size", type=int, default=16)
    parser.add_argument("--test-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.002, help="their -lrt (the preset's optim.lr)")
    parser.add_argument("--record", type=Path, help="write the authors' trajectory here (JSON)")
    parser.add_argument(
        "--json", type=Path, help="write both codes' accuracies, both protocols and the comparison here"
    )
    args = parser.parse_args()
    if args.schedule == "run-cosine" and (args.init == "theirs" or args.record):
        parser.error(
            "--schedule run-cosine trains trgl_pipe alone: it takes neither --init theirs nor --record"
        )
    return args


def protocols(test_by_epoch: list[list[float]], val_last: list[float]) -> dict[str, Any]:
    """Both reading rules on one run's accuracies: trgl_pipe's (the module best on validation at the
    last evaluation, shallowest on ties, its test accuracy then) and the authors' (the highest test
    accuracy over every epoch and module)."""
    best = best_module([{"index": k, "val_accuracy": v} for k, v in enumerate(val_last)])
    return {
        "best_module": best,
        "trgl_pipe": test_by_epoch[-1][best],
        "authors": max(max(epoch) for epoch in test_by_epoch),
    }


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    stubbed = stub_missing(OPTIONAL)
    script = import_script(args.checkout.resolve(), args.script)
    commit = checkout_commit(args.checkout)
    alone = args.schedule == "run-cosine"

    work = Path(tempfile.mkdtemp(prefix="parity_"))
    overrides = [*overrides_for(args), f"trgl.tau={args.tau}", f"out_dir={work / 'run'}", "log.live=off"]
    cfg = load_config(ROOT / args.preset, overrides)
    ctx = build_context(cfg, torch.device("cpu"))
    init_stages = [ctx.build_stage(k) for k in range(ctx.num_modules)]
    our_init = (
        [(s.body.state_dict(), s.head.state_dict()) for s in init_stages] if args.init == "ours" else []
    )
    started = time.perf_counter()
    theirs = None if alone else run_theirs(script, args, ctx, our_init)
    their_s = time.perf_counter() - started

    # trgl_pipe from the same initial weights
    init_file = work / "init.pt"
    if theirs is not None and args.init == "theirs":
        mapped = []
        for k, stage in enumerate(init_stages):
            pairing = pairs(_Holder(theirs["initial"][k]), stage.body, stage.head)
            state = {b: theirs["initial"][k][a] for a, b in pairing}
            body = {n[5:]: v for n, v in state.items() if n.startswith("body.")}
            head = {n[5:]: v for n, v in state.items() if n.startswith("head.")}
            stage.body.load_state_dict(body)
            stage.head.load_state_dict(head)
            mapped.append((stage.body, stage.head))
        save_initial_state(init_file, mapped)
    else:
        save_initial_state(init_file, [(s.body, s.head) for s in init_stages])
    cfg = load_config(ROOT / args.preset, [*overrides, f"model.init_state={init_file}"])
    ctx = build_context(cfg, torch.device("cpu"))
    stages = [ctx.build_stage(k) for k in range(ctx.num_modules)]
    pairings = (
        [pairs(_Holder(theirs["initial"][k]), s.body, s.head) for k, s in enumerate(stages)]
        if theirs is not None
        else []
    )

    print(f"authors' code: {args.checkout} commit {commit}, script {args.script}")
    if alone:
        print("  not run: --schedule run-cosine is trgl_pipe's own schedule (trgl_pipe alone is trained)")
    else:
        print(
            f"  as: {their_command(args)} "
            f"({'data and initial weights' if our_init else 'data'} from trgl_pipe)"
        )
    print(f"  stubbed (imported by their code for plots and analyses only): {', '.join(stubbed) or 'none'}")
    print(f"trgl_pipe: {args.preset} with {' '.join(overrides_for(args))} trgl.tau={args.tau:g}")
    print(
        f"versions: torch {torch.__version__}, python {platform.python_version()}, {args.threads} thread(s)"
    )
    print(f"data: {ctx.data.describe()}")
    print()
    if not alone:
        print(
            "step module | loss theirs        loss ours          | kinetic theirs   kinetic ours     "
            "| max |param diff|"
        )
    rows = iter(theirs["steps"]) if theirs else iter(())
    states = iter(theirs["states"]) if theirs else iter(())
    ours_acc: list[list[float]] = []
    worst = 0.0
    counts = dict.fromkeys(("steps", "loss_equal", "checksums_equal", "states_compared", "states_equal"), 0)
    largest_loss_rel = 0.0
    started = time.perf_counter()
    for epoch in range(args.epochs):
        for x, y in ctx.batches.train_batches(epoch):
            for k, stage in enumerate(stages):
                x = stage.train_step(x, y)
                if theirs is None:
                    continue
                row = next(rows)
                loss, kinetic = float(stage.last_loss), float(stage.last_kinetic)
                counts["steps"] += 1
                counts["loss_equal"] += loss == row["loss"]
                largest_loss_rel = max(largest_loss_rel, abs(loss - row["loss"]) / abs(row["loss"]))
                counts["checksums_equal"] += checksums(_Pair(stage)) == row["checksums"]
                if row["step"] < args.steps:
                    ref = next(states)
                    mine = {f"body.{n}": v for n, v in stage.body.state_dict().items()}
                    mine.update({f"head.{n}": v for n, v in stage.head.state_dict().items()})
                    diff = max(
                        float((ref[a].double() - mine[b].double()).abs().max()) for a, b in pairings[k]
                    )
                    worst = max(worst, diff)
                    counts["states_compared"] += 1
                    counts["states_equal"] += diff == 0
                    print(
                        f"{row['step']:4d} {k:6d} | {row['loss']:.12f} {loss:.12f} | "
                        f"{row['kinetic']:.10f} {kinetic:.10f} | {diff:.3g}"
                    )
        ours_acc.append(evaluate(stages, ctx, "test"))
    ours_val = evaluate(stages, ctx, "val")
    our_s = time.perf_counter() - started
    final_equal = None
    if theirs is not None:
        final_equal = all(
            torch.equal(
                theirs["final"][k][a],
                {
                    **{f"body.{n}": v for n, v in s.body.state_dict().items()},
                    **{f"head.{n}": v for n, v in s.head.state_dict().items()},
                }[b],
            )
            for k, s in enumerate(stages)
            for a, b in pairings[k]
        )
        print()
        print(
            f"parameters and buffers over the first {args.steps} steps of every module: "
            f"largest difference {worst:.3g} ({counts['states_equal']} of {counts['states_compared']} "
            "module-steps equal)"
        )
        print(
            f"every step: losses equal bit for bit at {counts['loss_equal']} of {counts['steps']} "
            "module-steps "
            f"(largest relative difference {largest_loss_rel:.3g}); parameter checksums equal at "
            f"{counts['checksums_equal']} of {counts['steps']}; final parameters and buffers "
            f"{'equal' if final_equal else 'differ'}"
        )
    print()
    print("test accuracy per module after each epoch (their test_par, trgl_pipe's heads), %")
    for epoch, mine in enumerate(ours_acc):
        ref = (
            f"theirs {' '.join(f'{100 * a:.2f}' for a in theirs['test_accuracy'][epoch])} | "
            if theirs
            else ""
        )
        print(f"  epoch {epoch}: {ref}ours {' '.join(f'{100 * a:.2f}' for a in mine)}")
    codes = {"trgl_pipe": {"test_accuracy": ours_acc, "val_accuracy": ours_val, "wall_s": our_s}}
    if theirs is not None:
        codes["authors"] = {
            "test_accuracy": theirs["test_accuracy"],
            "val_accuracy": theirs["val_accuracy"],
            "wall_s": their_s,
        }
    print("validation accuracy per module after the last epoch, %")
    for name, code in codes.items():
        code.update(protocols(code["test_accuracy"], code["val_accuracy"]))
        print(
            f"  {name}: {' '.join(f'{100 * a:.2f}' for a in code['val_accuracy'])}; trgl_pipe's protocol "
            f"(module {code['best_module']}) {100 * code['trgl_pipe']:.2f}, the authors' "
            f"{100 * code['authors']:.2f}"
        )
    if args.json:
        payload = {
            "about": "Both codes' accuracies from the same initial weights and batches "
            "(experiments/parity_authors.py); the authors' code unchanged, fed trgl_pipe's batches.",
            "authors": {
                "repository": "block-wise/module-wise",
                "commit": commit,
                "script": args.script,
                "command": None if alone else their_command(args),
                "run": not alone,
            },
            "command": "python experiments/parity_authors.py AUTHORS " + " ".join(sys.argv[2:]),
            "preset": args.preset,
            "overrides": [*overrides_for(args), f"trgl.tau={args.tau}"],
            "schedule": args.schedule,
            "seed": args.seed,
            "init": args.init,
            "data": ctx.data.describe(),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
            "compared": None
            if alone
            else {
                "module_steps": counts["steps"],
                "losses_equal_bit_for_bit": counts["loss_equal"],
                "largest_relative_loss_difference": largest_loss_rel,
                "parameter_checksums_equal": counts["checksums_equal"],
                "module_steps_states_compared": counts["states_compared"],
                "module_steps_states_equal": counts["states_equal"],
                "largest_state_difference": worst,
                "final_states_equal": final_equal,
            },
            "codes": codes,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    if args.record and theirs is not None:
        payload = {
            "about": "The authors' code's per-step numbers on a small fixed input; "
            "tests/test_authors_trajectory.py holds trgl_pipe's preset to them.",
            "authors": {
                "repository": "block-wise/module-wise",
                "commit": commit,
                "script": args.script,
                "command": their_command(args),
                "data_and_initial_weights": "trgl_pipe's (init=ours)" if our_init else "data from trgl_pipe",
            },
            "preset": args.preset,
            "overrides": [*overrides_for(args), f"trgl.tau={args.tau}"],
            "init": args.init,
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
            "steps": [{k: v for k, v in r.items()} for r in theirs["steps"][: args.steps * len(stages)]],
            "test_accuracy": theirs["test_accuracy"],
        }
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"\nwrote {args.record}")
    return 0


class _Pair(nn.Module):
    """A stage's body and head as one module whose state_dict lists body then head (their order)."""

    def __init__(self, stage: Any) -> None:
        super().__init__()
        self.body, self.head = stage.body, stage.head


def evaluate(stages: list, ctx: Any, split: str) -> list[float]:
    """Accuracy of every module's head on ``split``, eval mode, as their test_par computes it."""
    correct = [0] * len(stages)
    total = 0
    with torch.no_grad():
        for x, y in ctx.batches.eval_batches(split):
            total += len(y)
            for k, stage in enumerate(stages):
                stage.local_net.eval()
                x, _ = stage.body(x, kinetic_grad=False)
                correct[k] += int((stage.head(x).argmax(1) == y).sum())
    return [c / total for c in correct]


if __name__ == "__main__":
    sys.exit(main())
