"""Benchmark 3: peak memory of the heaviest pipeline rank against end-to-end training.

The paper's STL-10 setting: ResNet-110 (post-activation), 96×96 inputs, batch 64, fp32, synthetic
data, light auxiliary heads (3×3 conv, pool to 8×8, linear). For K = 2, 4, 8, 16 and the
equal-depth and memory-balanced splits, every module is measured on its own, as its rank would
hold it: its weights, gradients and momentum, the activations of two training steps, its input
receive slots and the outputs it may have in flight (``pipeline.buffer_size`` each).

    python benchmarks/memory.py                    # tensor-byte accounting, no compute
    python benchmarks/memory.py --device cuda      # torch.cuda.max_memory_allocated after a reset

Without a GPU the run happens on PyTorch's ``meta`` device: every operator runs its shape logic
but allocates nothing, and a dispatch mode adds up the bytes of every tensor storage from its
creation to its release — the bytes a CUDA caching allocator would report as allocated, without
cuDNN workspaces or the allocator's rounding.
"""

from __future__ import annotations

import argparse
import gc
import weakref
from typing import Any

import torch
from common import write_results
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trgl_pipe.config import load_config
from trgl_pipe.cost import aux_head_factory, measure_costs
from trgl_pipe.partition import split_balanced, split_by_depth
from trgl_pipe.stage import build_parts, build_stage

MIB = 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created inside the mode, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.live and storage.nbytes() > 0:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)


def config(args: argparse.Namespace, k: int, regime: str = "parallel", trgl: bool | None = None) -> Any:
    trgl = args.trgl if trgl is None else trgl
    return load_config(
        None,
        [
            "data.name=synthetic",
            f"data.image_size={args.image_size}",
            "data.channels=3",
            f"data.batch_size={args.batch}",
            f"data.eval_batch_size={args.batch}",
            f"model.depth={args.depth}",
            "model.block=postact",
            f"model.num_modules={k}",
            f"aux.pool_size={args.pool}",
            f"train.regime={regime}",
            f"trgl.enabled={str(trgl).lower()}",
            f"pipeline.buffer_size={args.buffer_size}",
        ],
    )


def measure(args: argparse.Namespace, fn) -> int:
    """Peak bytes of ``fn()`` on the chosen device."""
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        tracker = LiveTensorBytes()
        with tracker:
            fn()
        peak = tracker.peak
    gc.collect()
    return peak


def rank_peak(args: argparse.Namespace, cfg: Any, partition: list, k: int, in_shape: tuple) -> int:
    """Peak of the rank that trains module k: weights, two steps, slots, outputs in flight."""
    device = torch.device(args.device)
    num_modules = len(partition)

    def run() -> None:
        parts = build_parts(cfg, (3, args.image_size, args.image_size), 10)
        stage = build_stage(cfg, parts, partition, k, 10, 100, 10, device)
        slots = []
        if k > 0:  # pre-allocated receive slots (DistInbox)
            slots = [torch.empty((args.batch, *in_shape), device=device) for _ in range(args.buffer_size)]
        x = slots[0] if slots else torch.randn(args.batch, *in_shape, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        in_flight = []
        for _ in range(2):
            out = stage.train_step(x, y)
            if k < num_modules - 1:  # sends not yet completed keep their outputs alive
                in_flight = [*in_flight, out][-args.buffer_size :]
        del slots, in_flight

    return measure(args, run)


def single_process_peak(args: argparse.Namespace, cfg: Any, partition: list) -> int:
    """The single-process parallel regime: every module on one device, one batch after another."""
    device = torch.device(args.device)

    def run() -> None:
        parts = build_parts(cfg, (3, args.image_size, args.image_size), 10)
        stages = [build_stage(cfg, parts, partition, k, 10, 100, 10, device) for k in range(len(partition))]
        y = torch.randint(0, 10, (args.batch,), device=device)
        for _ in range(2):
            h = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
            for stage in stages:
                h = stage.train_step(h, y)

    return measure(args, run)


def input_shapes(args: argparse.Namespace, cfg: Any) -> list[tuple]:
    """Sample shape entering each block."""
    parts = build_parts(cfg, (3, args.image_size, args.image_size), 10)
    return [parts.input_of(i) for i in range(parts.num_blocks)]


def memory_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per K and split: every rank's peak against end-to-end training, plain (TRGL off, the
    paper's baseline) and with the TRGL term (which keeps every block's residual for backward)."""
    torch.manual_seed(0)
    e2e_cfg = config(args, 1, "e2e", trgl=False)
    n = e2e_cfg.model.num_blocks
    image = (3, args.image_size, args.image_size)
    shapes = input_shapes(args, e2e_cfg)
    plain = rank_peak(args, e2e_cfg, [(0, n)], 0, image)
    with_trgl = rank_peak(args, config(args, 1, "e2e", trgl=True), [(0, n)], 0, image)
    rows = [
        {
            "K": 1,
            "split": "e2e plain",
            "blocks": str([n]),
            "rank_MiB": str([round(plain / MIB)]),
            "heaviest_rank_MiB": round(plain / MIB),
            "ratio_to_plain_e2e": 1.0,
            "ratio_to_trgl_e2e": round(plain / with_trgl, 3),
            "single_process_MiB": round(plain / MIB),
        },
        {
            "K": 1,
            "split": "e2e with TRGL term",
            "blocks": str([n]),
            "rank_MiB": str([round(with_trgl / MIB)]),
            "heaviest_rank_MiB": round(with_trgl / MIB),
            "ratio_to_plain_e2e": round(with_trgl / plain, 3),
            "ratio_to_trgl_e2e": 1.0,
            "single_process_MiB": round(with_trgl / MIB),
        },
    ]
    cost_cfg = config(args, 2)
    parts = build_parts(cost_cfg, 3, 10)
    heads = aux_head_factory(parts, 10, cost_cfg)
    block_costs, end_costs = measure_costs(
        parts, image, args.batch, 10, heads, "memory", torch.device("meta")
    )
    for k in args.ks:
        cfg = config(args, k)
        for split in ("depth", "balanced"):
            partition = (
                split_by_depth(n, k) if split == "depth" else split_balanced(block_costs, k, end_costs)
            )
            peaks = []
            for i, (a, _) in enumerate(partition):
                in_shape = image if i == 0 else shapes[a]  # module 0 starts with the stem
                peaks.append(rank_peak(args, cfg, partition, i, in_shape))
            single = single_process_peak(args, cfg, partition)
            heaviest = max(peaks)
            rows.append(
                {
                    "K": k,
                    "split": split,
                    "blocks": str([b - a for a, b in partition]),
                    "rank_MiB": str([round(p / MIB) for p in peaks]),
                    "heaviest_rank_MiB": round(heaviest / MIB),
                    "ratio_to_plain_e2e": round(heaviest / plain, 3),
                    "ratio_to_trgl_e2e": round(heaviest / with_trgl, 3),
                    "single_process_MiB": round(single / MIB),
                    "single_over_heaviest": round(single / heaviest, 3),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["meta", "cuda"], default="cuda" if torch.cuda.is_available() else "meta"
    )
    parser.add_argument("--depth", type=int, default=110)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument("--buffer-size", type=int, default=2)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--trgl", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    rows = memory_rows(args)
    notes = [
        f"ResNet-{args.depth} (post-activation), {args.image_size}x{args.image_size}x3 inputs, "
        f"batch {args.batch}, fp32, aux heads pool to {args.pool}x{args.pool}, "
        f"buffer_size {args.buffer_size}; module-wise rows with TRGL {'on' if args.trgl else 'off'}.",
        "Baseline (ratio_to_plain_e2e): end-to-end training without the TRGL term, as the paper "
        "measures it. ratio_to_trgl_e2e: against end-to-end training with the term (its fused "
        "function keeps every block's residual for backward, so that baseline is larger).",
        "rank_MiB: each rank's peak (weights, gradients, SGD momentum, two training steps, receive slots and "
        "in-flight outputs); heaviest_rank_MiB: the largest.",
        "single_process_MiB: the parallel regime with every module in one process on one device; "
        "single_over_heaviest: that over the heaviest rank.",
        "balanced: model.split=balanced with model.balance_by=memory (saved activations + 3x parameters, "
        "measured per block, plus each possible head).",
        "Device 'meta': tensor-byte accounting without compute (no cuDNN workspaces, no allocator rounding); "
        "'cuda': torch.cuda.max_memory_allocated.",
    ]
    write_results(f"memory_{args.device}", "Peak memory per rank against end-to-end training", rows, notes)


if __name__ == "__main__":
    main()
