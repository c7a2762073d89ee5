"""Networks from user code: ``model.arch: "pkg.mod:callable"``, and the public pieces to build them.

The callable receives ``input_shape=(C, H, W)``, ``num_classes`` and ``model.arch_kwargs`` and
returns an ``nn.Sequential`` (its children are the blocks, in order) or a :class:`Network`
(a stem, the blocks, the network's own head). Each block is one of:

- a :class:`Residual` (``shortcut(x) + branch(x)``): the kinetic energy is exactly ‖branch(x)‖²;
- a module that returns ``(output, residuals)`` itself, ``residuals`` a list of tensors: the
  kinetic energy is the sum of their ‖r‖²;
- any other module returning a tensor: ‖b(x) − x‖² where its output has the shape of its input,
  else no transport cost (stated once in a warning).

The callable runs under the run's seed, so every rank builds the same initial weights.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trgl_pipe.errors import ConfigError
from trgl_pipe.models.backbone import Backbone
from trgl_pipe.models.blocks import ResidualBlock, TransportBlock


class Residual(ResidualBlock):
    """A residual block ``after(shortcut(x) + branch(x))`` whose kinetic energy is ‖branch(x)‖².

    ``shortcut=None`` is the identity; ``after`` (e.g. ``nn.ReLU()`` for a post-activation
    ResNet block) is applied to the sum and does not enter the energy. The energy is computed
    fused with the sum, as for the built-in backbones.
    """

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None, after: nn.Module | None = None):
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut
        self.after = after

    def branches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (x if self.shortcut is None else self.shortcut(x)), self.branch(x)

    def combine(self, s: Tensor) -> Tensor:
        return s if self.after is None else self.after(s)


@dataclass
class Network:
    """A user network: an optional ``stem`` (goes with module 0), the ``blocks`` the modules are cut
    from, and the network's own ``head`` (the last module's classifier; None: an auxiliary head).

    ``tokens=True`` says 4-D block outputs are tokens [N, H, W, D], not feature maps [N, C, H, W].
    ``presets`` maps a number of modules K to blocks per module, for ``model.split=preset``.
    """

    blocks: Sequence[nn.Module]
    stem: nn.Module | None = None
    head: nn.Module | None = None
    tokens: bool = False
    presets: dict[int, list[int]] = field(default_factory=dict)


class _UserBlock(TransportBlock):
    """A user's block with the output shape (one sample) it had when probed: every later call is
    held to it, so a block whose shape changes says so in one line instead of failing inside
    the transport cost or the next module (``where`` names it: ``model.arch=… block i (Type)``)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.where = type(block).__name__
        self.shape: tuple[int, ...] | None = None  # set once probed

    def _checked(self, out: Tensor) -> Tensor:
        if self.shape is not None and tuple(out.shape[1:]) != self.shape:
            raise ConfigError(
                f"{self.where} returned samples of shape {list(out.shape[1:])}, but {list(self.shape)} "
                "when the network was built: a block's output shape must depend on its input's only"
            )
        return out


class ProtocolBlock(_UserBlock):
    """A user block that returns ``(output, residuals)`` itself."""

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        out, residuals = self.block(x)
        return self._checked(out), list(residuals)


class PlainBlock(_UserBlock):
    """A user block returning a tensor; its residual is ``b(x) − x`` when ``displacement``."""

    def __init__(self, block: nn.Module, displacement: bool) -> None:
        super().__init__(block)
        self.displacement = displacement

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = self._checked(self.block(x))
        return out, [out - x] if self.displacement else []


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """One line on stderr, once per process, from rank 0 only (every rank builds the network)."""
    if message in _WARNED or os.environ.get("RANK", "0") != "0":
        return
    _WARNED.add(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _probe(module: nn.Module, x: Tensor, calls: int = 1) -> Any:
    """Forwards of one copy of ``module`` on meta tensors (on zeros when meta is refused): two
    samples shaped like ``x``, then three, ... (``calls`` of them; a list when more than one)."""
    outputs: list[Any] = []
    with torch.no_grad():
        try:
            probe = copy.deepcopy(module).to("meta").eval()
            outputs = [probe(torch.empty((n, *x.shape[1:]), dtype=x.dtype, device="meta")) for n in (1, 3)]
        except Exception:
            probe = copy.deepcopy(module).eval()
            outputs = [probe(torch.zeros((n, *x.shape[1:]), dtype=x.dtype)) for n in (2, 3)]
    return outputs[:calls] if calls > 1 else outputs[0]


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {', '.join(type(v).__name__ for v in value)}"
    return f"a {type(value).__name__}"


def _check_module(what: str, value: Any, path: str) -> nn.Module | None:
    if value is not None and not isinstance(value, nn.Module):
        raise ConfigError(f"model.arch={path}: its {what} is a {type(value).__name__}, not an nn.Module")
    return value


def network_from(result: Any, path: str) -> Network:
    """What the user callable returned, as a :class:`Network` (one-line error otherwise)."""
    if isinstance(result, Network):
        net = result
    elif isinstance(result, nn.Sequential):
        net = Network(blocks=list(result.children()))
    else:
        raise ConfigError(
            f"model.arch={path} returned {_describe(result)}; expected an nn.Sequential of blocks "
            "or a trgl_pipe.Network(stem=..., blocks=[...], head=...)"
        )
    net.blocks = list(net.blocks)
    if not net.blocks:
        raise ConfigError(f"model.arch={path} returned a network without blocks; give it at least one")
    for i, block in enumerate(net.blocks):
        _check_module(f"block {i}", block, path)
    _check_module("stem", net.stem, path)
    _check_module("head", net.head, path)
    return net


def backbone_from_network(
    net: Network, arch: str, input_shape: tuple[int, int, int], warn: bool = True
) -> Backbone:
    """Wrap each block as a transport block (see the module docstring) and record its shapes."""
    h = torch.empty((1, *input_shape))
    if net.stem is not None:
        h = _probe(net.stem, h)
        if not isinstance(h, Tensor):
            raise ConfigError(f"model.arch={arch}: the stem returns {_describe(h)}; expected a tensor")
    stem_shape = tuple(h.shape[1:])
    blocks: list[nn.Module] = []
    shapes: list[tuple[int, ...]] = []
    costless = []
    for i, block in enumerate(net.blocks):
        if isinstance(block, TransportBlock):
            out, _ = _probe(block, h)
            wrapped: nn.Module = block
        else:
            out, again = _probe(block, h, calls=2)
            if (
                isinstance(out, (tuple, list))
                and len(out) == 2
                and isinstance(out[0], Tensor)
                and isinstance(out[1], (tuple, list))
                and all(isinstance(r, Tensor) for r in out[1])
            ):
                out = out[0]
                wrapped = ProtocolBlock(block)
            elif isinstance(out, Tensor):
                keeps = tuple(out.shape[1:]) == tuple(h.shape[1:])
                wrapped = PlainBlock(block, displacement=keeps)
                if not keeps:
                    costless.append(i)
            else:
                raise ConfigError(
                    f"model.arch={arch}: block {i} ({type(block).__name__}) returns {_describe(out)}; "
                    "expected a tensor or (output, [residual tensors])"
                )
        if isinstance(wrapped, _UserBlock):  # a second call, another batch: the same sample shape?
            again = again[0] if isinstance(wrapped, ProtocolBlock) else again
        else:
            again = out
        if not isinstance(again, Tensor) or tuple(again.shape[1:]) != tuple(out.shape[1:]):
            raise ConfigError(
                f"model.arch={arch}: block {i} ({type(block).__name__}) returned {_describe(out)}, then "
                f"{_describe(again)} on its next call (another batch of the same input shape): a block's "
                "output shape must depend on its input's only"
            )
        if isinstance(wrapped, _UserBlock):
            wrapped.shape = tuple(out.shape[1:])
            wrapped.where = f"model.arch={arch}: block {i} ({type(block).__name__})"
        shapes.append(tuple(out.shape[1:]))
        blocks.append(wrapped)
        h = out
    if costless and warn:
        _warn_once(
            f"model.arch={arch}: blocks {costless} change the shape of their input and are neither "
            "Residual nor return (output, residuals): they pay no transport cost"
        )
    return Backbone(
        arch,
        net.stem,
        blocks,
        net.head,  # type: ignore[arg-type]
        input_shape,
        tokens=net.tokens,
        presets=dict(net.presets),
        shapes=shapes,
        stem_shape=stem_shape,
    )


def user_backbone(cfg: Any, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> Backbone:
    """The network ``model.arch`` names, built under the run's seed."""
    from trgl_pipe.models.init import fork_seeded
    from trgl_pipe.plugins import call_user, load_callable

    build = load_callable("model.arch", cfg.arch)
    with fork_seeded(seed, 0):
        result = call_user(
            "model.arch",
            cfg.arch,
            build,
            input_shape=tuple(input_shape),
            num_classes=num_classes,
            **cfg.arch_kwargs,
        )
    net = network_from(result, cfg.arch)
    if cfg.init != "default":
        from trgl_pipe.models.init import init_scheme

        for part in (net.stem, *net.blocks, net.head):
            if part is not None:
                init_scheme(part, cfg.init, cfg.init_gain)
    return backbone_from_network(net, cfg.arch, input_shape)


def user_head(
    path: str, shape: tuple[int, ...], num_classes: int, module: int, num_modules: int
) -> nn.Module:
    """The auxiliary head ``aux.head`` builds for a module whose output has ``shape`` (one sample)."""
    from trgl_pipe.plugins import call_user, load_callable

    build = load_callable("aux.head", path)
    head = call_user(
        "aux.head",
        path,
        build,
        shape=tuple(shape),
        num_classes=num_classes,
        module=module,
        num_modules=num_modules,
    )
    if not isinstance(head, nn.Module):
        raise ConfigError(f"aux.head={path} returned {_describe(head)}; expected an nn.Module")
    return head
