"""A module's own random stream, for its dropout and stochastic depth.

Layers such as Swin's stochastic depth draw from torch's global generator. Left there, a
module's masks would depend on which other modules share its process and in what order they
run, every data-parallel replica would draw the same masks, and ``seed`` would not reach them.
Each stage instead swaps in its own generator state around its training forward, seeded from
(seed, module, replica): the pipeline then computes what the one-process run computes with
stochastic layers too, and a checkpoint carries the stream on.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from trgl_pipe.models.init import seeded

STREAM_TAG = 7  # seeded(seed, STREAM_TAG, module, replica): apart from the initialisation's tags
_GLOBAL_RNG = threading.Lock()  # threads of one process (pipeline.transport=sim) share the global generator


def is_stochastic(module: nn.Module) -> bool:
    """Whether ``module`` draws random numbers in training mode (dropout, stochastic depth)."""
    # torchvision's StochasticDepth, if torchvision is loaded: a network without it cannot hold
    # one, and importing torchvision only to ask costs every rank 1.2 s of start-up
    ops = sys.modules.get("torchvision.ops")
    kinds: tuple[type, ...] = (nn.modules.dropout._DropoutNd,)
    if ops is not None:
        kinds = (*kinds, ops.StochasticDepth)
    return any(isinstance(m, kinds) and m.p > 0 for m in module.modules())


class RandomStream:
    """Generator states (CPU, and the stage's CUDA device) that only one module draws from."""

    def __init__(self, seed: int, module: int, device: torch.device, replica: int = 0) -> None:
        self.device = device
        self.cpu = torch.Generator().manual_seed(seeded(seed, STREAM_TAG, module, replica)).get_state()
        self.cuda = (
            torch.Generator(device=device).manual_seed(seeded(seed, STREAM_TAG, module, replica)).get_state()
            if device.type == "cuda"
            else None
        )

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block torch's global generator is this stream; outside it is unchanged."""
        with _GLOBAL_RNG:
            outer_cpu = torch.get_rng_state()
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                outer_cuda = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(self.cuda, self.device)
            try:
                yield
            finally:
                self.cpu = torch.get_rng_state()
                torch.set_rng_state(outer_cpu)
                if self.cuda is not None:
                    self.cuda = torch.cuda.get_rng_state(self.device)
                    torch.cuda.set_rng_state(outer_cuda, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "cuda": self.cuda}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cpu = state["cpu"]
        if self.cuda is not None and state["cuda"] is not None:
            self.cuda = state["cuda"]
