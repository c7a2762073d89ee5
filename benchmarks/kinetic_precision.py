"""How accurately and how fast the kinetic energy is reduced, on real activations.

    python benchmarks/kinetic_precision.py              # both parts
    python benchmarks/kinetic_precision.py --repeats 9

error:  relative error against float64 of C = Σ r² / d for the residuals r of real networks on
        real inputs (ResNet-20 on the embedded Fashion-MNIST batch; the STL-10 preset's
        ResNet-110 at 96x96 on synthetic images), in fp32 and under bf16 autocast: one long
        float32 dot product (the former reduction), the partial dots used now
        (models.blocks.sum_of_squares), and the authors' torch.mean(r**2).
speed:  forward + backward of ``skip + r`` with the energy, per residual shape: the former fused
        function (dot, addcmul), the present one (partial dots, product then sum), and autograd
        of ``skip + r`` and ``mean(r**2)``; interleaved round by round, medians.
step:   a whole training step of every module of ResNet-20 (Fashion-MNIST, batch 128, K = 4,
        TRGL, mean reduction) with the former function swapped in, against the present one,
        interleaved step by step on the same batch, medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_results
from torch import Tensor

from trgl_pipe.config import load_config
from trgl_pipe.context import build_context
from trgl_pipe.models import blocks
from trgl_pipe.models.blocks import add_with_energy


class _Former(torch.autograd.Function):
    """The reduction before this benchmark: one float32 dot, addcmul in backward."""

    @staticmethod
    def forward(ctx, skip: Tensor, r: Tensor, divisor: int) -> tuple[Tensor, Tensor]:
        flat = r.float().reshape(-1)
        ctx.save_for_backward(r)
        ctx.divisor = divisor
        return skip + r, torch.dot(flat, flat) / divisor

    @staticmethod
    def backward(ctx, g_sum: Tensor, g_energy: Tensor) -> tuple[Tensor, Tensor, None]:
        (r,) = ctx.saved_tensors
        return g_sum, torch.addcmul(g_sum, r, (g_energy * (2.0 / ctx.divisor)).to(r.dtype)), None


def former(skip: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    return _Former.apply(skip, r, r.numel())


def present(skip: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    return add_with_energy(skip, r, "mean")


def authors(skip: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    return skip + r, torch.mean(r**2)


VARIANTS = {"former (one dot)": former, "present (partial dots)": present, "authors (mean(r**2))": authors}


def residuals(overrides: list[str], precision: str) -> list[tuple[str, Tensor]]:
    """The residual of the first block of every stage of a real network on one training batch."""
    cfg = load_config(None, [*overrides, f"train.precision={precision}", "trgl.reduction=mean"])
    ctx = build_context(cfg, torch.device("cpu"))
    x, _ = next(ctx.batches.train_batches(0))
    found: list[tuple[str, Tensor]] = []
    seen: set[tuple[int, ...]] = set()
    dtype = torch.bfloat16 if precision == "bf16" else None
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        for k in range(ctx.num_modules):
            body = ctx.build_stage(k).body
            if body.stem is not None:
                x = body.stem(x)
            for block in body.blocks:
                x, rs = block(x)
                for r in rs:
                    if tuple(r.shape) not in seen:
                        seen.add(tuple(r.shape))
                        found.append(("x".join(map(str, r.shape)), r.detach().clone()))
    return found


NETWORKS = {
    "ResNet-20, Fashion-MNIST (embedded), batch 128": [
        "data.source=embedded",
        "data.val_size=100",
        "model.block=postact",
        "model.shortcut=pad",
    ],
    "ResNet-110 STL-10 preset, 96x96 synthetic, batch 64": [
        "data.name=synthetic",
        "data.image_size=96",
        "data.train_size=64",
        "data.val_size=8",
        "data.test_size=8",
        "data.batch_size=64",
        "model.depth=110",
        "model.block=postact",
        "model.shortcut=pad",
        "model.init=orthogonal",
        "model.init_gain=0.1",
        "model.num_modules=4",
        "model.split=[14, 28, 41]",
    ],
}


def error_rows() -> list[dict]:
    rows = []
    for net, overrides in NETWORKS.items():
        for precision in ("fp32", "bf16"):
            for shape, r in residuals(overrides, precision):
                exact = float((r.double() ** 2).mean())
                row = {"network": net, "precision": precision, "residual": shape}
                for name, fn in VARIANTS.items():  # under autocast, as in a bf16 step
                    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                        value = float(fn(torch.zeros_like(r), r)[1])
                    row[name] = abs(value - exact) / exact
                rows.append(row)
    return rows


def speed_rows(repeats: int) -> list[dict]:
    rows = []
    shapes = [(128, 16, 28, 28), (128, 64, 7, 7), (64, 16, 96, 96), (64, 64, 24, 24)]
    for shape in shapes:
        gen = torch.Generator().manual_seed(0)
        skip, r0, g = (torch.randn(shape, generator=gen) for _ in range(3))
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(repeats):
            for name, fn in VARIANTS.items():  # interleaved: the load of the machine hits all alike
                r = r0.clone().requires_grad_(True)
                t0 = time.perf_counter()
                s, e = fn(skip, r)
                torch.autograd.backward([s, e], [g, torch.tensor(0.5)])
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        row = {"residual": "x".join(map(str, shape))}
        row.update({f"{name} ms": v for name, v in med.items()})
        row["present / former"] = med["present (partial dots)"] / med["former (one dot)"]
        row["authors / former"] = med["authors (mean(r**2))"] / med["former (one dot)"]
        rows.append(row)
    return rows


def step_rows(repeats: int) -> list[dict]:
    """Median train_step time per module, the former fused function against the present one."""
    cfg = load_config(
        None, [*NETWORKS["ResNet-20, Fashion-MNIST (embedded), batch 128"], "trgl.reduction=mean"]
    )
    ctx = build_context(cfg, torch.device("cpu"))
    x, y = next(ctx.batches.train_batches(0))
    present_fn = blocks._SumWithKinetic
    rows = []
    for k in range(ctx.num_modules):
        stage = ctx.build_stage(k)
        times: dict[str, list[float]] = {"former": [], "present": []}
        for _ in range(repeats):
            for name, fn in (("former", _Former), ("present", present_fn)):
                blocks._SumWithKinetic = fn
                try:
                    t0 = time.perf_counter()
                    out = stage.train_step(x, y)
                    times[name].append(time.perf_counter() - t0)
                finally:
                    blocks._SumWithKinetic = present_fn
        x = out
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        rows.append(
            {
                "module": k,
                "former step ms": med["former"],
                "present step ms": med["present"],
                "present / former": med["present"] / med["former"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    notes = [
        f"CPU, {args.threads} thread(s); the machine was shared with other jobs while this ran, so "
        "times are medians of interleaved rounds and their ratios, not absolute rates.",
        "error: |C - C_float64| / C_float64 of each reduction on the same residual.",
    ]
    write_results("kinetic_precision", "Kinetic energy: relative error against float64", error_rows(), notes)
    write_results(
        "kinetic_speed",
        "Kinetic energy: forward + backward of skip + r with the energy",
        speed_rows(args.repeats),
        [*notes[:1], f"{args.repeats} interleaved rounds per shape; medians."],
    )
    write_results(
        "kinetic_step",
        "Kinetic energy: whole training step per module, former against present reduction",
        step_rows(args.repeats),
        [*notes[:1], f"{args.repeats} interleaved steps per variant and module; medians."],
    )


if __name__ == "__main__":
    main()
