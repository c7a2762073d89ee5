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


def test_the_gradient_link_gets_a_communicator_of_its_own(monkeypatch) -> None:
    # NCCL ignores tags: forward and backward sends on one communicator can wait on each other
    from datetime import timedelta

    from trgl_pipe.runtime import mesh
    from trgl_pipe.runtime.layout import Layout

    made: list[tuple[int, ...]] = []

    def new_group(ranks, timeout=None):
        made.append(tuple(ranks))
        return object()

    monkeypatch.setattr(mesh.dist, "new_group", new_group)
    layout = Layout(4, 2, 1)  # K=4 modules, 2 per rank: 2 stages
    forward = mesh.pipeline_group(layout, 1, timedelta(seconds=5))
    backward = mesh.pipeline_group(layout, 1, timedelta(seconds=5))
    assert forward is not backward and made[0] == made[1]
    made.clear()
    two = Layout(2, 1, 2)  # 2 stages x 2 replicas: every rank creates both replicas' groups
    mesh.pipeline_group(two, 3, timedelta(seconds=5))
    assert made == [(two.rank_of(0, 0), two.rank_of(1, 0)), (two.rank_of(0, 1), two.rank_of(1, 1))]


@pytest.mark.parametrize("regime", ["ddg", "fr", "parallel"])
def test_only_the_delayed_regimes_open_a_second_pipeline_communicator(monkeypatch, regime) -> None:
    from trgl_pipe.config import load_config
    from trgl_pipe.runtime import mesh
    from trgl_pipe.runtime.layout import Layout

    groups: list[object] = []

    def new_group(ranks, timeout=None):
        groups.append(object())
        return groups[-1]

    monkeypatch.setattr(mesh, "agree_on_backend", lambda *args: "gloo")
    monkeypatch.setattr(mesh.dist, "init_process_group", lambda *args, **kwargs: None)
    monkeypatch.setattr(mesh.dist, "PrefixStore", lambda *args: None)
    monkeypatch.setattr(mesh.dist, "new_group", new_group)
    monkeypatch.setattr(mesh.DeviceMesh, "from_group", lambda *args, **kwargs: None)
    extra = ["trgl.enabled=false"] if regime != "parallel" else []
    cfg = load_config(None, [f"train.regime={regime}", "model.num_modules=2", *extra])
    env = mesh.LaunchEnv(0, 2, 0, 2, "localhost", 1, 0, False)
    session = mesh.init_distributed(cfg, env, Layout(2), torch.device("cpu"), None, None, 5)
    assert session.pp_group is groups[0]
    if regime == "parallel":
        assert session.backward_group is None and len(groups) == 3  # pp, dp of each stage
    else:
        assert session.backward_group is groups[-1] and len(groups) == 4
