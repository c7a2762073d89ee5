"""Weight initialisation (``model.init``, ``model.init_gain``).

- ``default``: the architecture's own. CIFAR ResNets: Kaiming-normal convolutions (fan-out),
  unit BatchNorm, linear layers as PyTorch initialises them; torchvision backbones: torchvision's.
- ``kaiming``: the authors' Kaiming option: Kaiming-normal (fan-out, ReLU) for every convolution
  *and* linear layer, heads included; BatchNorm weight 1, every bias 0.
- ``orthogonal``: the authors' default: orthogonal weights with gain ``model.init_gain`` (0.05 in
  their scripts) for every convolution and linear layer, heads included; BatchNorm 1/0, biases 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def init_default(module: nn.Module) -> None:
    """Kaiming-normal convolutions and unit BatchNorm, as in the CIFAR ResNet papers."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / m.in_features**0.5
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


def init_scheme(module: nn.Module, scheme: str, gain: float = 0.05) -> None:
    """Initialise every convolution, linear and normalisation layer of ``module`` by ``scheme``."""
    if scheme == "default":
        init_default(module)
        return
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "orthogonal":
                nn.init.orthogonal_(m.weight, gain=gain)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_out", nonlinearity="relu")
            else:
                raise ValueError(f"unknown initialisation {scheme}")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def seeded(seed: int, *tags: int) -> int:
    """A per-part seed derived from the run seed, stable across K, regime and rank."""
    value = seed & 0xFFFFFFFF
    for tag in tags:
        value = (value * 1_000_003 + tag + 1) & 0x7FFFFFFFFFFFFFFF
    return value


@contextlib.contextmanager
def fork_seeded(seed: int, *tags: int) -> Iterator[None]:
    """The global RNG seeded from (seed, tags) inside the block, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeded(seed, *tags))
        yield
