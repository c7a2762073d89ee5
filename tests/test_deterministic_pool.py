"""train.deterministic on CUDA: the heads pool exactly where the map divides, warn_only where not."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trgl_pipe.models.heads import AuxHead, AveragePool, FinalHead, deterministic_pools


def test_an_evenly_divided_map_pools_to_the_adaptive_means_with_a_plain_kernel() -> None:
    x = torch.randn(3, 4, 8, 12, dtype=torch.float64)
    pool = AveragePool(4)
    assert pool.exact_for(8, 12) and not pool.exact_for(7, 7)
    exact = F.avg_pool2d(x, (8 // 4, 12 // 4))  # what runs on CUDA under deterministic algorithms
    assert torch.allclose(exact, F.adaptive_avg_pool2d(x, 4), rtol=0, atol=1e-12)
    assert torch.equal(pool(x), F.adaptive_avg_pool2d(x, 4))  # on a CPU: the adaptive pool, as before


def test_heads_say_whether_their_pool_can_be_exact() -> None:
    assert AuxHead(8, 10, pool_size=2, spatial=(8, 8)).exact_pool
    assert not AuxHead(8, 10, pool_size=2, spatial=(7, 7)).exact_pool
    assert AuxHead(8, 10, pool_kernel=2, spatial=(7, 7)).exact_pool
    head = FinalHead(8, 10, preact=True)
    assert isinstance(head.pool, AveragePool) and head.pool.exact_for(7, 7)
    assert "pool" not in "".join(head.state_dict())  # checkpoints keep their keys


def test_torchvision_pools_are_swapped_without_changing_parameters() -> None:
    seq = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Sequential(nn.AdaptiveAvgPool2d(7)), nn.Linear(2, 2))
    keys = list(seq.state_dict())
    deterministic_pools(seq)
    assert isinstance(seq[0], AveragePool) and seq[0].size == (1, 1)
    assert isinstance(seq[1][0], AveragePool) and seq[1][0].size == (7, 7)
    assert list(seq.state_dict()) == keys


def test_an_operation_without_a_deterministic_kernel_turns_failures_into_warnings_and_says_so(capsys) -> None:
    from trgl_pipe.models.determinism import Finding
    from trgl_pipe.stage import allow_nondeterministic

    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        torch.use_deterministic_algorithms(True)
        allow_nondeterministic(3, [])
        assert not torch.is_deterministic_algorithms_warn_only_enabled()  # nothing found: it fails
        found = [Finding("head", "_adaptive_avg_pool2d_backward", "torch.nn.AdaptiveAvgPool2d")]
        allow_nondeterministic(3, found)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        out = capsys.readouterr().out
        assert out.count("\n") == 1
        assert "module 3 runs operations without a deterministic CUDA kernel: head (torch.nn.Adaptive" in out
        assert "warns instead of failing on them, for every module of this process" in out
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
