"""Benchmark 3: peak memory of every pipeline rank against end-to-end training.

The baseline is plain end-to-end training (TRGL off), as the paper measures its savings; a second
column compares with end-to-end training with the TRGL term, which keeps every block's residual
for backward. Every module is measured on its own, as its rank would hold it: its weights,
gradients and momentum, the activations of two training steps, its input receive slots and the
outputs it may have in flight (``pipeline.buffer_size`` each).

    python benchmarks/memory.py                       # STL-10 ResNet-110, batch 64, K = 2/4/8/16
    python benchmarks/memory.py --arch resnet152      # a backbone at the paper's setting (K=4)
    python benchmarks/memory.py --arch all            # every row of the paper's memory figures
    python benchmarks/memory.py --device cuda         # torch.cuda.max_memory_allocated after a reset

``--arch`` takes the shipped config of that backbone's row of the paper (TinyImageNet 64×64 for
VGG-19 and the ResNets, Swin-T at 96×96 (STL-10) and 32×32 (CIFAR)) with synthetic data of its
shape. Without a GPU the run happens on PyTorch's ``meta`` device: every operator runs its shape
logic but allocates nothing, and a dispatch mode adds up the bytes of every tensor storage from its
creation to its release — the bytes a CUDA caching allocator would report as allocated, without
cuDNN workspaces or the allocator's rounding.
"""

from __future__ import annotations

import argparse
import copy
import gc
import weakref
from typing import Any

import torch
from common import ROOT, write_results
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trgl_pipe.config import load_config
from trgl_pipe.cost import aux_head_factory, measure_costs
from trgl_pipe.partition import split_balanced, split_by_depth
from trgl_pipe.runtime.layout import slot_samples
from trgl_pipe.stage import build_parts, build_stage

MIB = 2**20
CLASSES = {"tiny_imagenet": 200, "cifar100": 100}
# --arch: (shipped config, extra overrides, the paper's savings against end-to-end, VanGL / TRGL, K=4)
ROWS = {
    "resnet110": ("configs/stl10_resnet110_k4.yaml", ["aux.pool_size=8"], "STL-10 equal depth: 27% / 24%"),
    "vgg19": ("configs/tinyimagenet_vgg19_k4.yaml", [], "27% / 21%"),
    "resnet50": ("configs/tinyimagenet_resnet50_k4.yaml", [], "26% / 20%"),
    "resnet101": ("configs/tinyimagenet_resnet101_k4.yaml", [], "24% / 11%"),
    "resnet152": ("configs/tinyimagenet_resnet152_k4.yaml", [], "21% / 10%"),
    "swin_t-96": ("configs/stl10_swin_t_k4.yaml", [], "STL-10: 55% / 50%"),
    "swin_t-32": ("configs/cifar10_swin_t_k4.yaml", [], "CIFAR-10/100: 33% / 29%"),
}


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


class Setting:
    """One row of the paper: a shipped config on synthetic data of its shape."""

    def __init__(
        self, args: argparse.Namespace, path: str, extra: list[str], image: int | None = None
    ) -> None:
        base = load_config(ROOT / path, extra)
        self.path, self.extra, self.args = path, extra, args
        sizes = {"tiny_imagenet": 64, "stl10": 96, "cifar10": 32, "cifar100": 32}
        self.image = image or sizes[base.data.name]
        self.classes = CLASSES.get(base.data.name, 10)
        self.batch = args.batch or base.data.batch_size
        self.shape = (3, self.image, self.image)
        self.name = base.model.name + (f" {self.image}px" if base.model.arch.startswith("swin") else "")

    def config(self, k: int, regime: str = "parallel", trgl: bool = True) -> Any:
        return load_config(
            ROOT / self.path,
            [
                *self.extra,
                "data.name=synthetic",
                "data.source=auto",
                "data.root=null",
                f"data.image_size={self.image}",
                "data.channels=3",
                f"data.num_classes={self.classes}",
                f"data.batch_size={self.batch}",
                f"data.eval_batch_size={self.batch}",
                f"model.num_modules={k}",
                "model.split=depth",
                f"train.regime={regime}",
                f"trgl.enabled={str(trgl).lower()}",
                f"pipeline.buffer_size={self.args.buffer_size}",
            ],
        )


def measure(device: str, fn) -> int:
    """Peak bytes of ``fn()`` on ``device``."""
    gc.collect()
    if device == "cuda":
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


def rank_peak(setting: Setting, cfg: Any, parts: Any, partition: list, k: int, in_shape: tuple) -> int:
    """Peak of the rank that trains module k: weights, two steps, slots, outputs in flight."""
    device = torch.device(setting.args.device)
    batch, buffers = setting.batch, setting.args.buffer_size
    fresh = copy.deepcopy(parts)  # built outside the count: only what the rank holds is counted

    def run() -> None:
        stage = build_stage(cfg, fresh, partition, k, setting.classes, 100, 10, device)
        slots = []
        if k > 0:  # pre-allocated receive slots (DistInbox), of the run's size (here eval = batch)
            size = slot_samples(cfg.data.batch_size, cfg.data.eval_batch_size)
            slots = [torch.empty((size, *in_shape), device=device) for _ in range(buffers)]
        x = slots[0][:batch] if slots else torch.randn(batch, *in_shape, device=device)
        y = torch.randint(0, setting.classes, (batch,), device=device)
        in_flight = []
        for _ in range(2):
            out = stage.train_step(x, y)
            if k < len(partition) - 1:  # sends not yet completed keep their outputs alive
                in_flight = [*in_flight, out][-buffers:]
        del slots, in_flight

    return measure(setting.args.device, run)


def single_process_peak(setting: Setting, cfg: Any, parts: Any, partition: list) -> int:
    """The single-process parallel regime: every module on one device, one batch after another."""
    device = torch.device(setting.args.device)
    fresh = copy.deepcopy(parts)

    def run() -> None:
        stages = [
            build_stage(cfg, fresh, partition, k, setting.classes, 100, 10, device)
            for k in range(len(partition))
        ]
        y = torch.randint(0, setting.classes, (setting.batch,), device=device)
        for _ in range(2):
            h = torch.randn(setting.batch, *setting.shape, device=device)
            for stage in stages:
                h = stage.train_step(h, y)

    return measure(setting.args.device, run)


def memory_rows(setting: Setting, ks: list[int]) -> list[dict[str, Any]]:
    """Per K and split: every rank's peak against end-to-end training, plain (TRGL off, the
    paper's baseline) and with the TRGL term (which keeps every block's residual for backward)."""
    torch.manual_seed(0)
    e2e_cfg = setting.config(1, "e2e", trgl=False)
    parts = build_parts(e2e_cfg, setting.shape, setting.classes)
    n = parts.num_blocks
    plain = rank_peak(setting, e2e_cfg, parts, [(0, n)], 0, setting.shape)
    trgl_cfg = setting.config(1, "e2e", trgl=True)
    with_trgl = rank_peak(
        setting, trgl_cfg, build_parts(trgl_cfg, setting.shape, setting.classes), [(0, n)], 0, setting.shape
    )
    head = {"setting": setting.name, "batch": setting.batch}
    rows = [
        {
            **head,
            "K": 1,
            "split": "e2e plain",
            "blocks": str([n]),
            "rank_MiB": str([round(plain / MIB)]),
            "heaviest_rank_MiB": round(plain / MIB),
            "ratio_to_plain_e2e": 1.0,
            "ratio_to_trgl_e2e": round(plain / with_trgl, 3),
        },
        {
            **head,
            "K": 1,
            "split": "e2e with TRGL term",
            "blocks": str([n]),
            "rank_MiB": str([round(with_trgl / MIB)]),
            "heaviest_rank_MiB": round(with_trgl / MIB),
            "ratio_to_plain_e2e": round(with_trgl / plain, 3),
            "ratio_to_trgl_e2e": 1.0,
        },
    ]
    for k in ks:
        cfg = setting.config(k)
        module_parts = build_parts(cfg, setting.shape, setting.classes)
        heads = aux_head_factory(module_parts, setting.classes, cfg)
        block_costs, end_costs = measure_costs(
            module_parts, setting.shape, setting.batch, setting.classes, heads, "memory", torch.device("meta")
        )
        splits = ["depth", "balanced"] + (["preset"] if k in module_parts.presets else [])
        for split in splits:
            if split == "depth":
                partition = split_by_depth(n, k)
            elif split == "balanced":
                partition = split_balanced(block_costs, k, end_costs)
            else:  # the authors' split for this backbone and K
                sizes = module_parts.presets[k]
                partition = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(k)]
            peaks = []
            for i, (a, _) in enumerate(partition):
                in_shape = setting.shape if i == 0 else module_parts.input_of(a)  # module 0 has the stem
                peaks.append(rank_peak(setting, cfg, module_parts, partition, i, in_shape))
            single = single_process_peak(setting, cfg, module_parts, partition)
            heaviest = max(peaks)
            rows.append(
                {
                    **head,
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


def default_args(**overrides: Any) -> argparse.Namespace:
    values = {"device": "meta", "batch": None, "buffer_size": 2, **overrides}
    return argparse.Namespace(**values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["meta", "cuda"], default="cuda" if torch.cuda.is_available() else "meta"
    )
    parser.add_argument("--arch", default="resnet110", choices=[*ROWS, "all"])
    parser.add_argument("--batch", type=int, default=None, help="default: the config's (ResNet-110: 64)")
    parser.add_argument("--buffer-size", type=int, default=2)
    parser.add_argument(
        "--ks", type=int, nargs="+", default=None, help="default: 2 4 8 16 for resnet110, else 4"
    )
    args = parser.parse_args()
    names = list(ROWS) if args.arch == "all" else [args.arch]
    rows, papers = [], []
    for name in names:
        path, extra, paper = ROWS[name]
        setting = Setting(args, path, extra)
        ks = args.ks or ([2, 4, 8, 16] if name == "resnet110" else [4])
        rows += memory_rows(setting, ks)
        papers.append(
            f"{setting.name}: {path}; the paper's savings against end-to-end at K=4 (VanGL / TRGL): {paper}"
        )
    notes = [
        "Synthetic data of each setting's shape; fp32; the shipped config's heads, batch and buffer_size "
        f"{args.buffer_size}; module-wise rows with TRGL on.",
        "Baseline (ratio_to_plain_e2e): end-to-end training without the TRGL term, as the paper measures it. "
        "ratio_to_trgl_e2e: against end-to-end training with the term (its fused function keeps every "
        "block's residual for backward, so that baseline is larger).",
        "rank_MiB: each rank's peak (weights, gradients, SGD momentum, two training steps, receive slots and "
        "in-flight outputs); heaviest_rank_MiB: the largest.",
        "single_process_MiB: the parallel regime with every module in one process on one device; "
        "single_over_heaviest: that over the heaviest rank.",
        "balanced: model.split=balanced with model.balance_by=memory (saved activations + 3x parameters, "
        "measured per block, plus each possible head).",
        "Device 'meta': tensor-byte accounting without compute (no cuDNN workspaces, no allocator rounding); "
        "'cuda': torch.cuda.max_memory_allocated.",
        *papers,
    ]
    suffix = "" if args.arch == "resnet110" else f"_{args.arch}"
    columns = [
        "setting",
        "batch",
        "K",
        "split",
        "blocks",
        "rank_MiB",
        "heaviest_rank_MiB",
        "ratio_to_plain_e2e",
        "ratio_to_trgl_e2e",
        "single_process_MiB",
        "single_over_heaviest",
    ]
    title = "Peak memory per rank against end-to-end training"
    write_results(f"memory_{args.device}{suffix}", title, rows, notes, columns=columns)


if __name__ == "__main__":
    main()
