"""A compiled stage compiles nothing after its warm-up, in the input layout training really uses.

Dynamo's graphs are counted with the ``eager`` backend (no code generation: the guards and
recompiles, and so the graph count, are the same as inductor's, in seconds instead of a cold
inductor compile's minute); ``test_native_paths`` checks that inductor computes what eager does.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from trgl_pipe.context import build_context


@pytest.fixture
def eager_compile(monkeypatch):
    original = nn.Module.compile

    def compile_eager(self, *args, **kwargs):
        return original(self, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(nn.Module, "compile", compile_eager)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("module", [0, 1], ids=["first-module-nchw-data", "later-module-channels-last-input"])
def test_warm_up_compiles_every_graph_a_channels_last_run_uses(tiny, eager_compile, module) -> None:
    cfg = tiny("train.compile=true", "train.channels_last=true", "model.num_modules=2")
    torch.set_num_threads(1)
    ctx = build_context(cfg, torch.device("cpu"))
    first = ctx.build_stage(0)
    stage = first if module == 0 else ctx.build_stage(1)
    shape = ctx.input_shape
    if module == 1:
        shape = tuple(first.forward_frozen(torch.zeros(1, *ctx.input_shape)).shape[1:])
    stage.forward_frozen(torch.zeros(1, *shape))  # the handshake's probe
    # this run's sizes: batches of 64 and a last one of 44; evaluation 100 (val) and 100, 100 (test)
    stage.warm_up(shape, torch.float32, [64, 44], [100, 100])
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0

    def arriving(n: int) -> torch.Tensor:  # data is NCHW; a later module receives channels_last
        x = torch.randn(n, *shape)
        return x if module == 0 else x.contiguous(memory_format=torch.channels_last)

    for n in (64, 44, 64):
        stage.train_step(arriving(n), torch.randint(0, 10, (n,)))
    for n in (100, 100):
        stage.eval_step(arriving(n), torch.randint(0, 10, (n,)), "val")
    stage.pop_eval_results()
    assert counters["stats"]["unique_graphs"] == compiled, "recompiled after the warm-up"


def test_every_replica_makes_as_many_training_warm_up_passes(tiny, eager_compile) -> None:
    # a training pass through SyncBatchNorm is a collective per layer over the replicas: batches
    # of 64 and a last one of 63 split into shards of 32, 32 (replica 0) and 32, 31 (replica 1);
    # one pass per distinct size would give replica 0 one pass and replica 1 two (a hang)
    from trgl_pipe.training.rank import warm_up_sizes

    assert warm_up_sizes([[32, 32], [32, 31]]) == [[32, 32], [32, 31]]
    assert warm_up_sizes([[64], [64, 44], [22, 22]]) == [[64, 64], [64, 44], [22, 22]]
    cfg = tiny("train.compile=true", "model.num_modules=1")
    torch.set_num_threads(1)
    ctx = build_context(cfg, torch.device("cpu"))
    passes = []
    for sizes in warm_up_sizes([[32, 32], [32, 31]]):
        stage = ctx.build_stage(0)
        calls: list[int] = []
        stage.local_net.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(1))
        stage.warm_up(ctx.input_shape, torch.float32, sizes, [])
        passes.append(len(calls))
    assert passes == [2, 2]
