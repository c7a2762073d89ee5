"""Which device and which backend a rank gets, from what the environment shows it."""

from __future__ import annotations

import pytest
import torch

from trgl_pipe import context
from trgl_pipe.errors import ConfigError
from trgl_pipe.runtime.mesh import choose_data_backend


def test_one_visible_gpu_per_rank_counts_as_a_gpu_of_its_own() -> None:
    # Slurm sets CUDA_VISIBLE_DEVICES per task: every rank sees "cuda:0", but the GPUs differ
    identities = [f"node1/GPU-{i}" for i in range(4)]
    assert choose_data_backend("auto", identities) == "nccl"


def test_ranks_sharing_a_gpu_or_without_one_use_gloo() -> None:
    assert choose_data_backend("auto", ["node1/GPU-0", "node1/GPU-0", "node1/GPU-1"]) == "gloo"
    assert choose_data_backend("auto", ["cpu", "cpu"]) == "gloo"
    assert choose_data_backend("auto", ["node1/GPU-0", "cpu"]) == "gloo"
    assert choose_data_backend("gloo", ["node1/GPU-0", "node1/GPU-1"]) == "gloo"
    # the same GPU number on two hosts is two GPUs
    assert choose_data_backend("auto", ["node1/GPU-0", "node2/GPU-0"]) == "nccl"


def test_nccl_requested_without_a_gpu_per_rank_is_one_line() -> None:
    with pytest.raises(
        ConfigError,
        match=r"pipeline.backend=nccl needs a GPU of its own on every rank, but 1 ranks have no GPU",
    ):
        choose_data_backend("nccl", ["node1/GPU-0", "cpu"])
    with pytest.raises(ConfigError, match="1 ranks share a GPU with another rank"):
        choose_data_backend("nccl", ["node1/GPU-0", "node1/GPU-0"])


@pytest.mark.parametrize(
    ("visible", "local_rank", "expected"),
    [(0, 3, "cpu"), (1, 3, "cuda:0"), (4, 3, "cuda:3"), (2, 3, "cuda:1")],
    ids=["no-gpu", "one-visible-per-task", "one-per-rank", "shared"],
)
def test_the_rank_device_follows_the_visible_gpus(
    monkeypatch, visible: int, local_rank: int, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert str(context.resolve_device("auto", local_rank)) == expected


def test_mig_instances_are_not_gpus_of_their_own() -> None:
    from trgl_pipe.runtime.mesh import is_mig

    assert is_mig("NVIDIA A100-SXM4-80GB MIG 1g.10gb", "")
    assert is_mig("NVIDIA H100 80GB HBM3", "MIG-4f0e0b3c-8f51-5f63-9a6e-2a9d7c2d6c5e")
    assert not is_mig("NVIDIA H100 80GB HBM3", "0,1")
    # two slices of one GPU have UUIDs of their own: without the MIG mark they would get NCCL
    slices = ["node1/MIG-a/mig", "node1/MIG-b/mig"]
    assert choose_data_backend("auto", slices) == "gloo"
    with pytest.raises(ConfigError, match="2 ranks run on MIG instances, which NCCL cannot link"):
        choose_data_backend("nccl", slices)
