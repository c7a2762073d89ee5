"""A compiled stage compiles nothing after its warm-up, in the input layout training really uses.

Dynamo's graphs are counted with the ``eager`` backend (no code generation: the guards and
recompiles are the same as inductor's, in seconds); ``test_native_paths`` checks inductor itself.
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
