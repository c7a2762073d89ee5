"""Measure what each residual block (and each possible head) costs, for the ``balanced`` split.

``time``: median wall time of forward + local loss + backward of a block on one batch, on the
device that will train it. ``memory``: bytes autograd saves for backward plus parameters,
gradients and one optimizer buffer: deterministic, and what bounds a rank's peak memory.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from trgl_pipe.models import Backbone, kinetic_energy


def saved_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes of distinct storages autograd saves while running ``fn`` (parameters excluded)."""
    seen: dict[int, int] = {}
    keep: list[object] = []  # keeps each storage object alive, so its id stays unique while we count

    def pack(t: Tensor) -> Tensor:
        if not isinstance(t, nn.Parameter):
            storage = t.untyped_storage()
            seen[id(storage)] = storage.nbytes()
            keep.append(storage)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _param_bytes(module: nn.Module) -> int:
    # weights + gradients + one optimizer buffer (SGD momentum)
    return 3 * sum(p.numel() * p.element_size() for p in module.parameters())


def median_time(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up (synchronised on CUDA)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_costs(
    parts: Backbone,
    input_shape: tuple[int, int, int],
    batch_size: int,
    num_classes: int,
    head_factory: Callable[[int], nn.Module],
    by: str,
    device: torch.device,
    repeats: int = 3,
) -> tuple[list[float], list[float]]:
    """Per-block costs and per-block "a module ends here" costs (its head), in seconds or bytes.

    ``head_factory(i)`` builds the head a module ending after block i would get.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *input_shape, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    block_costs, end_costs = [], []
    if parts.stem is not None:
        stem = copy.deepcopy(parts.stem).to(device)
        with torch.no_grad():
            h = stem(x)
        stem_cost = _cost_of(lambda: stem(x.requires_grad_(False)).sum(), stem, by, device, repeats)
    else:
        h, stem_cost = x, 0.0
    for i, block in enumerate(parts.blocks):
        block = copy.deepcopy(block).to(device)
        inp = h.detach()

        def run_block(block: nn.Module = block, inp: Tensor = inp) -> Tensor:
            out, residuals = block(inp)
            return out.sum() + sum((kinetic_energy(r) for r in residuals), out.new_zeros(()))

        cost = _cost_of(run_block, block, by, device, repeats)
        block_costs.append(cost + (stem_cost if i == 0 else 0.0))
        with torch.no_grad():
            h, _ = block(inp)
        head = head_factory(i).to(device)
        feat = h.detach()

        def run_head(head: nn.Module = head, feat: Tensor = feat) -> Tensor:
            return nn.functional.cross_entropy(head(feat), y)

        end_costs.append(_cost_of(run_head, head, by, device, repeats))
    return block_costs, end_costs


def _cost_of(
    fn: Callable[[], Tensor], module: nn.Module, by: str, device: torch.device, repeats: int
) -> float:
    if by == "memory":
        return float(saved_bytes(fn) + _param_bytes(module))

    def step() -> None:
        module.zero_grad(set_to_none=True)
        fn().backward()

    return median_time(step, device, repeats)


def aux_head_factory(parts: Backbone, num_classes: int, cfg: Any) -> Callable[[int], nn.Module]:
    """The head a module ending after block i would get (as :func:`trgl_pipe.stage.build_head`
    makes it; per-module pooling lists count with their first value)."""
    from trgl_pipe.stage import make_aux_head

    k = cfg.model.num_modules

    def make(i: int) -> nn.Module:
        if i == len(parts.blocks) - 1 and cfg.aux.last == "own" and parts.head is not None:
            return copy.deepcopy(parts.head)
        return make_aux_head(parts, i, 0, k, num_classes, cfg)

    return make
