"""Benchmark 7: what each local objective costs — memory at the paper's setting, and step time
against VanGL.

    python benchmarks/objectives_cost.py --parts memory    # STL-10 ResNet-110, 96x96, batch 64, K = 4/8/16
    python benchmarks/objectives_cost.py --parts time      # step time per method / VanGL, interleaved rounds

memory: the accounting of benchmarks/memory.py (meta device without a GPU): every rank's peak with
        its weights, gradients, momentum, the objective's networks, two training steps, receive slots
        and outputs in flight, plus the images an InfoPro rank receives and passes on; the heaviest
        rank and the single-process parallel regime against plain end-to-end training (VanGL's
        objective, one module).
time:   the whole parallel regime's training step (every module, one process) of each method on
        the same batch, methods in a fresh random order every round; per method the median over
        rounds of its step time over VanGL's in the same round, with the rounds' min and max.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from common import workload, write_results
from memory import MIB, ROWS, Setting, default_args, measure, rank_peak

from trgl_pipe.config import load_config
from trgl_pipe.context import build_context
from trgl_pipe.objectives import needs_image
from trgl_pipe.partition import split_by_depth
from trgl_pipe.stage import build_parts, build_stage
from trgl_pipe.training.from_next import NextGradient, NextWeights, connect_in_process

# name -> overrides; "dgl_mlp_sr" and "sedona" are VanGL with DGL's MLP-SR head and SEDONA's
METHODS = {
    "vangl": ["objective.name=vangl"],
    "trgl": ["objective.name=trgl"],
    "infopro_softmax": ["objective.name=infopro"],
    "infopro_contrast": ["objective.name=infopro", "objective.kwargs.loss=contrast"],
    "infopro_l": ["objective.name=infopro_l"],
    "predsim": ["objective.name=predsim"],
    "auglocal": ["objective.name=auglocal"],  # d = 3, pyramid c = 0.5
    "man": ["objective.name=man"],  # N = 1, 2c2f head
    "hpff": ["objective.name=hpff"],  # the authors' weights, 2c2f heads, four patch decoders
    "dgl_mlp_sr": ["objective.name=vangl", "aux.type=dgl_mlp_sr"],
    "sedona": ["objective.name=vangl", "aux.type=sedona", "aux.depth=2"],  # SEDONA's head, depth 2
}
# the TRGL paper's savings against end-to-end, STL-10 ResNet-110, equal-depth modules
PAPER = {
    4: {"vangl": "27%", "trgl": "24%", "infopro_contrast": "18%"},
    8: {"vangl": "50%", "trgl": "48%", "infopro_contrast": "37%"},
    16: {"vangl": "61%", "trgl": "58%", "infopro_contrast": "59%"},
}


def method_config(setting: Setting, method: str, k: int) -> Any:
    """The setting's config for K modules with ``method``'s overrides set on it."""
    cfg = setting.config(k)
    for item in METHODS[method]:
        key, _, value = item.partition("=")
        section, name, *inner = key.split(".")
        if inner:  # objective.kwargs.loss: one key of a mapping
            owner = getattr(cfg, section)
            setattr(owner, name, {**getattr(owner, name), inner[0]: yaml.safe_load(value)})
        else:
            setattr(getattr(cfg, section), name, yaml.safe_load(value))
    return cfg


def objective_rank_peak(
    setting: Setting, cfg: Any, parts: Any, partition: list, k: int, in_shape: tuple
) -> int:
    """:func:`memory.rank_peak` plus the image: received with each batch (``buffer_size`` in
    flight) and passed on, when module k or a later one reads it."""
    num = len(partition)
    if not any(needs_image(cfg, j, num) for j in range(k, num)):
        return rank_peak(setting, cfg, parts, partition, k, in_shape)
    device = torch.device(setting.args.device)
    batch, buffers = setting.batch, setting.args.buffer_size
    fresh = copy.deepcopy(parts)

    def run() -> None:
        stage = build_stage(cfg, fresh, partition, k, setting.classes, 100, 10, device)
        if k == 0:  # the first rank's input is the image
            slots = images = [torch.randn(batch, *in_shape, device=device)]
        else:  # receive slots, and each batch's image received into a tensor of its own
            slots = [torch.empty((batch, *in_shape), device=device) for _ in range(buffers)]
            images = [torch.randn(batch, *setting.shape, device=device) for _ in range(buffers)]
        y = torch.randint(0, setting.classes, (batch,), device=device)
        in_flight = []
        reads = needs_image(cfg, k, num)
        step = stage.train_step
        if "gradient" in stage.objective.needs_from_next:  # HPFF: a gradient each way, one step late
            exchange = NextGradient(stage)
            exchange.send = lambda t, grad: None  # the exchange keeps the last one it sent
            shape = parts.shapes[partition[k][1] - 1]
            exchange.receive = lambda: (stage.num_steps - 1, torch.randn(batch, *shape, device=device))
            step = exchange.train_step
        for _ in range(2):
            out = step(slots[0], y, images[0] if reads else None)
            if k < num - 1:
                in_flight = [*in_flight, out][-buffers:]
        del slots, images, in_flight

    return measure(setting.args.device, run)


def objective_single_peak(setting: Setting, cfg: Any, parts: Any, partition: list) -> int:
    device = torch.device(setting.args.device)
    fresh = copy.deepcopy(parts)
    num = len(partition)

    def run() -> None:
        stages = [build_stage(cfg, fresh, partition, k, setting.classes, 100, 10, device) for k in range(num)]
        steps = training_steps(stages)
        y = torch.randint(0, setting.classes, (setting.batch,), device=device)
        for _ in range(2):
            image = torch.randn(setting.batch, *setting.shape, device=device)
            h = image
            for k, step in enumerate(steps):
                h = step(h, y, image if needs_image(cfg, k, num) else None)

    return measure(setting.args.device, run)


def memory_part(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    path, extra, _ = ROWS["resnet110"]
    setting = Setting(default_args(device=args.device), path, extra)
    torch.manual_seed(0)
    e2e_cfg = setting.config(1, "e2e", trgl=False)
    parts = build_parts(e2e_cfg, setting.shape, setting.classes)
    n = parts.num_blocks
    plain = rank_peak(setting, e2e_cfg, parts, [(0, n)], 0, setting.shape)
    rows = []
    for k in args.ks:
        partition = split_by_depth(n, k)
        for method in args.methods:
            cfg = method_config(setting, method, k)
            module_parts = build_parts(cfg, setting.shape, setting.classes)
            peaks = []
            for i, (a, _) in enumerate(partition):
                in_shape = setting.shape if i == 0 else module_parts.input_of(a)
                peaks.append(objective_rank_peak(setting, cfg, module_parts, partition, i, in_shape))
            single = objective_single_peak(setting, cfg, module_parts, partition)
            heaviest = max(peaks)
            rows.append(
                {
                    "K": k,
                    "method": method,
                    "rank_MiB": str([round(p / MIB) for p in peaks]),
                    "heaviest_rank_MiB": round(heaviest / MIB),
                    "heaviest_saving": f"{1 - heaviest / plain:.0%}",
                    "single_process_MiB": round(single / MIB),
                    "single_saving": f"{1 - single / plain:.0%}",
                    "paper_saving": PAPER.get(k, {}).get(method, ""),
                }
            )
            print(rows[-1], flush=True)
    notes = [
        f"{setting.name} on synthetic 3x96x96 data (STL-10's shape), batch {setting.batch}, fp32, "
        f"equal-depth modules (blocks {[b - a for a, b in split_by_depth(n, 4)]} at K=4), buffer_size 2; "
        f"device '{args.device}' (meta: tensor-byte accounting without compute, as benchmarks/memory.py).",
        f"Baseline: plain end-to-end training (one module, no transport term): {round(plain / MIB)} MiB. "
        "heaviest_saving = 1 - heaviest rank / baseline; single_saving = 1 - the single-process parallel "
        "regime (every module in one process) / baseline.",
        "paper_saving: the TRGL paper's measured savings (its memory table, STL-10 ResNet-110, equal depth), "
        "where it gives one; its InfoPro is the contrastive one with the authors' own split and heads.",
        "InfoPro ranks hold the image receive buffers (buffer_size batches of 3x96x96) besides the "
        "activations.",
    ]
    return rows, notes


def training_steps(stages: list[Any]) -> list[Any]:
    """Each module's training step as a run makes it: with what it exchanges with the next module
    (MAN's weights, HPFF's gradient and replay), passed module to module in one process."""
    objective = stages[0].objective
    if "gradient" in objective.needs_from_next:
        exchanges: list[Any] = [NextGradient(stage) for stage in stages]
        connect_in_process(exchanges)
        return [exchange.train_step for exchange in exchanges]
    if "weights" in objective.needs_from_next:
        exchanges = [NextWeights(stage) for stage in stages]
        connect_in_process(exchanges)
        for exchange in exchanges:
            exchange.start()

        def step(exchange: Any) -> Any:
            def run(x: Any, y: Any, image: Any) -> Any:
                exchange.before_step()
                out = exchange.stage.train_step(x, y, image)
                exchange.after_step()
                return out

            return run

        return [step(exchange) for exchange in exchanges]
    return [stage.train_step for stage in stages]


def time_part(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # recorded with the results: was the machine idle?
    wl = argparse.Namespace(
        batch=args.batch, depth=args.depth, width=args.width, k=args.k, steps=10, trgl=True
    )
    stages, steps, batches = {}, {}, None
    for method in args.methods:
        cfg = load_config(None, [*workload(wl, Path(tempfile.mkdtemp())), *METHODS[method]])
        ctx = build_context(cfg, torch.device("cpu"))
        stages[method] = [ctx.build_stage(i) for i in range(ctx.num_modules)]
        steps[method] = training_steps(stages[method])
        if batches is None:
            batches = [b for _, b in zip(range(args.rounds + 2), ctx.batches.train_batches(0), strict=False)]
    order = list(args.methods)
    rng = random.Random(0)
    times: dict[str, list[float]] = {m: [] for m in order}
    for r, (x, y) in enumerate(batches):
        rng.shuffle(order)
        for method in order:
            t0 = time.perf_counter()
            h = x
            for k, step in enumerate(steps[method]):
                h = step(h, y, x if stages[method][k].objective.needs_image else None)
            if r >= 2:  # the first two rounds warm up
                times[method].append(time.perf_counter() - t0)
    rows = []
    for method in args.methods:
        ratios = [t / v for t, v in zip(times[method], times["vangl"], strict=True)]
        rows.append(
            {
                "method": method,
                "step_ms_median": round(1000 * statistics.median(times[method]), 1),
                "ratio_to_vangl_median": round(statistics.median(ratios), 3),
                "ratio_min": round(min(ratios), 3),
                "ratio_max": round(max(ratios), 3),
                "rounds": len(ratios),
            }
        )
        print(rows[-1], flush=True)
    notes = [
        f"ResNet-{args.depth} width {args.width}, K={args.k} equal-depth modules, embedded Fashion-MNIST "
        f"1x28x28, batch {args.batch}, CPU, {args.threads} thread(s), one process (parallel regime); "
        f"{args.rounds} timed rounds after 2 warm-up rounds, every method once per round on the same batch, "
        "in a fresh random order each round.",
        "ratio_to_vangl: a method's step time over VanGL's in the same round; median, min and max over "
        "rounds.",
        f"Load average (1 min, this benchmark's own thread included) {load_before:.2f} before and "
        f"{os.getloadavg()[0]:.2f} after the timed rounds, on {os.cpu_count()} cores. Ratios are measured "
        "side by side in every round; absolute times hold only on a machine as idle as that.",
    ]
    return rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["memory", "time"], default=["memory", "time"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument(
        "--device", choices=["meta", "cuda"], default="cuda" if torch.cuda.is_available() else "meta"
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--k", type=int, default=4, help="time: modules")
    parser.add_argument("--depth", type=int, default=38)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if "vangl" not in args.methods:
        args.methods = ["vangl", *args.methods]
    if "memory" in args.parts:
        rows, notes = memory_part(args)
        write_results(f"objectives_memory_{args.device}", "Memory per local objective and K", rows, notes)
    if "time" in args.parts:
        rows, notes = time_part(args)
        write_results(
            f"objectives_time_k{args.k}", "Step time per local objective against VanGL", rows, notes
        )


if __name__ == "__main__":
    main()
