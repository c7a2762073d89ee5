"""Cut an ordered list of blocks into K contiguous modules. Pure functions, no torch.

A partition is a list of K half-open block ranges ``(start, stop)`` that cover ``0..num_blocks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from trgl_pipe.errors import ConfigError

Partition = list[tuple[int, int]]


def _check_k(num_blocks: int, num_modules: int) -> None:
    if num_modules < 1:
        raise ConfigError(f"model.num_modules must be at least 1, got {num_modules}")
    if num_modules > num_blocks:
        raise ConfigError(
            f"model.num_modules={num_modules} is larger than the number of residual blocks "
            f"({num_blocks}); each module needs at least one block"
        )


def split_by_depth(num_blocks: int, num_modules: int) -> Partition:
    """Equal numbers of blocks; when K does not divide the count, the later modules get one more.

    The early modules run at the highest resolution, so they are already the heaviest.
    """
    _check_k(num_blocks, num_modules)
    base, extra = divmod(num_blocks, num_modules)
    sizes = [base + (1 if k >= num_modules - extra else 0) for k in range(num_modules)]
    return _ranges_from_sizes(sizes)


def split_at(num_blocks: int, cuts: Sequence[int]) -> Partition:
    """Modules starting at block 0 and at each index in ``cuts`` (strictly increasing)."""
    starts = [0, *cuts]
    stops = [*cuts, num_blocks]
    if any(b <= a for a, b in zip(starts, stops, strict=True)):
        raise ConfigError(
            f"model.split={list(cuts)} must be strictly increasing block indices between 1 and "
            f"{num_blocks - 1}"
        )
    return list(zip(starts, stops, strict=True))


def split_balanced(
    block_costs: Sequence[float], num_modules: int, end_costs: Sequence[float] | None = None
) -> Partition:
    """Contiguous split that minimises the largest module cost (ties: the earliest such split).

    The cost of a module of blocks ``a..b-1`` is ``sum(block_costs[a:b]) + end_costs[b-1]``,
    where ``end_costs[i]`` is what a module pays for ending after block i (its head).
    Exact dynamic programme in O(K·N²), fine for the ≤ a few hundred blocks of a ResNet.
    """
    n = len(block_costs)
    _check_k(n, num_modules)
    ends = list(end_costs) if end_costs is not None else [0.0] * n
    if len(ends) != n:
        raise ValueError(f"end_costs has {len(ends)} entries for {n} blocks")
    prefix = [0.0]
    for c in block_costs:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int) -> float:
        return prefix[b] - prefix[a] + ends[b - 1]

    inf = float("inf")
    # best[k][i]: smallest max-cost of splitting the first i blocks into k modules
    best = [[inf] * (n + 1) for _ in range(num_modules + 1)]
    choice = [[0] * (n + 1) for _ in range(num_modules + 1)]
    best[0][0] = 0.0
    for k in range(1, num_modules + 1):
        for i in range(k, n - (num_modules - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], cost(j, i))
                if value < best[k][i] - 1e-12:
                    best[k][i], choice[k][i] = value, j
    bounds = [n]
    for k in range(num_modules, 0, -1):
        bounds.append(choice[k][bounds[-1]])
    bounds.reverse()
    return list(pairwise(bounds))


def module_costs(
    partition: Partition, block_costs: Sequence[float], end_costs: Sequence[float] | None = None
) -> list[float]:
    """The cost of each module of ``partition`` under the same cost model as :func:`split_balanced`."""
    ends = list(end_costs) if end_costs is not None else [0.0] * len(block_costs)
    return [sum(block_costs[a:b]) + ends[b - 1] for a, b in partition]


def _ranges_from_sizes(sizes: Sequence[int]) -> Partition:
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return ranges
