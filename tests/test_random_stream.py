"""Stochastic layers draw from their module's own stream, seeded from (seed, module, replica)."""

from __future__ import annotations

import copy

import torch

from trgl_pipe.context import build_context
from trgl_pipe.models.random_stream import RandomStream, is_stochastic

SWIN = [
    "model.arch=swin_t",
    "model.patch_size=2",
    "model.window_size=2",
    "model.stochastic_depth=0.5",
    "data.name=synthetic",
    "data.channels=3",
    "data.image_size=32",
    "data.batch_size=8",
    "model.num_modules=4",
]


def _draws(stream: RandomStream) -> torch.Tensor:
    with stream.active():
        return torch.rand(8)


def test_a_stream_is_its_own_and_leaves_the_global_generator_alone() -> None:
    cpu = torch.device("cpu")
    before = torch.get_rng_state()
    a, b = RandomStream(0, 1, cpu), RandomStream(0, 1, cpu)
    first = _draws(a)
    assert torch.equal(first, _draws(b))  # same (seed, module, replica): same draws
    assert not torch.equal(first, _draws(a))  # the stream moves on
    assert not torch.equal(first, _draws(RandomStream(0, 1, cpu, replica=1)))
    assert not torch.equal(first, _draws(RandomStream(1, 1, cpu)))
    assert not torch.equal(first, _draws(RandomStream(0, 2, cpu)))
    assert torch.equal(torch.get_rng_state(), before)


def test_only_models_with_dropout_or_stochastic_depth_get_a_stream(tiny) -> None:
    resnet = build_context(tiny(), torch.device("cpu"))
    assert all(resnet.build_stage(i).random is None for i in range(resnet.num_modules))
    swin = build_context(tiny(*SWIN), torch.device("cpu"))
    stage = swin.build_stage(1)
    assert is_stochastic(stage.local_net) and stage.random is not None
    off = build_context(tiny(*SWIN, "model.stochastic_depth=0"), torch.device("cpu"))
    assert off.build_stage(1).random is None


def test_masks_follow_the_seed_the_replica_and_a_checkpoint(tiny) -> None:
    ctx = build_context(tiny(*SWIN), torch.device("cpu"))
    x, y = next(ctx.batches.train_batches(0))
    stage = ctx.build_stage(0)
    copies = [copy.deepcopy(stage) for _ in range(3)]
    copies[2].use_replica_stream(1)
    torch.manual_seed(123)  # the global generator's state must not matter
    a = stage.train_step(x, y)
    torch.manual_seed(456)
    assert torch.equal(a, copies[0].train_step(x, y))
    assert not torch.equal(a, copies[2].train_step(x, y))  # another replica, other masks
    # a stage loaded from a checkpoint continues the stream: the next step is the same
    resumed = copies[1]  # not stepped yet (stages of one context share the blocks: copies do not)
    resumed.load_state_dict(copy.deepcopy(stage.state_dict()))
    assert torch.equal(stage.train_step(x, y), resumed.train_step(x, y))
