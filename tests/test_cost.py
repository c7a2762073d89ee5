"""Block costs for the balanced split."""

from __future__ import annotations

import torch

from trgl_pipe.config import load_config
from trgl_pipe.cost import aux_head_factory, measure_costs, saved_bytes
from trgl_pipe.partition import module_costs, split_balanced, split_by_depth
from trgl_pipe.stage import build_parts


def test_saved_bytes_counts_each_storage_once_on_any_device() -> None:
    for device in ("cpu", "meta"):
        w = torch.randn(8, 8, device=device, requires_grad=True)
        x = torch.randn(4, 8, device=device)

        def fn(w=w, x=x):
            h = x @ w  # saves x only: x needs no gradient, so w is not needed
            return (h.relu() * h).sum()  # relu saves its output; mul saves relu(h) again, and h

        expected = 4 * (4 * 8) * 3  # x, h, relu(h): relu(h) counted once
        assert saved_bytes(fn) == expected, device


def test_memory_balanced_split_relieves_the_full_resolution_module() -> None:
    cfg = load_config(None, ["model.depth=32", "model.block=postact", "aux.pool_size=8"])
    parts = build_parts(cfg, (3, 32, 32), 10)
    heads = aux_head_factory(parts, 10, cfg)
    costs, ends = measure_costs(parts, (3, 32, 32), 16, 10, heads, "memory", torch.device("meta"))
    assert len(costs) == len(ends) == parts.num_blocks
    assert costs[0] > costs[-1] > 0  # full resolution costs more than 8x8, even with 4x the channels
    depth = split_by_depth(parts.num_blocks, 4)
    balanced = split_balanced(costs, 4, ends)
    assert max(module_costs(balanced, costs, ends)) < max(module_costs(depth, costs, ends))
    assert balanced[0][1] < depth[0][1]
