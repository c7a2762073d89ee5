from __future__ import annotations

import itertools
import random

import pytest

from trgl_pipe.errors import ConfigError
from trgl_pipe.partition import module_costs, split_at, split_balanced, split_by_depth


def test_depth_split_gives_remainders_to_later_modules() -> None:
    assert split_by_depth(9, 4) == [(0, 2), (2, 4), (4, 6), (6, 9)]
    assert split_by_depth(54, 16)[0] == (0, 3)
    assert split_by_depth(6, 6) == [(i, i + 1) for i in range(6)]
    assert split_by_depth(5, 1) == [(0, 5)]


def test_k_larger_than_blocks_is_an_error() -> None:
    with pytest.raises(ConfigError, match="larger than the number of residual blocks"):
        split_by_depth(3, 4)
    with pytest.raises(ConfigError):
        split_balanced([1.0, 2.0], 3)


def test_explicit_cuts() -> None:
    assert split_at(9, [3, 5, 8]) == [(0, 3), (3, 5), (5, 8), (8, 9)]
    with pytest.raises(ConfigError, match="strictly increasing"):
        split_at(9, [3, 3])
    with pytest.raises(ConfigError):
        split_at(9, [0, 4])


def _brute_force(costs: list[float], ends: list[float], k: int) -> float:
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        parts = list(itertools.pairwise(bounds))
        best = min(best, max(module_costs(parts, costs, ends)))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_balanced_split_is_optimal(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(3, 9)
    k = rng.randint(1, n)
    costs = [rng.uniform(0.1, 5) for _ in range(n)]
    ends = [rng.uniform(0, 2) for _ in range(n)]
    parts = split_balanced(costs, k, ends)
    assert len(parts) == k and parts[0][0] == 0 and parts[-1][1] == n
    assert all(a < b for a, b in parts)
    assert max(module_costs(parts, costs, ends)) == pytest.approx(_brute_force(costs, ends, k))


def test_balanced_split_moves_blocks_away_from_a_heavy_start() -> None:
    costs = [8, 8, 8, 1, 1, 1, 1, 1, 1]
    assert split_balanced(costs, 3) == [(0, 1), (1, 2), (2, 9)]
