"""Which operations of a training step have no deterministic CUDA kernel, found on any device.

``torch.use_deterministic_algorithms(True)`` makes some CUDA operations throw at their first call
(mostly backward passes: adaptive pooling, bilinear upsampling, ...). Which of them a network uses
depends on the network, its head and the local objective's own networks, and a GPU is needed to
find out by failing. Here one training step runs on the CPU under a dispatch mode that records
every ATen operation; the ones torch documents as throwing on CUDA are reported with the network
that ran them. :data:`CUDA_THROWS` follows torch's documented list (the docstring of
``torch.use_deterministic_algorithms``); a test checks it against that list, so a torch release
that adds an entry is noticed.

While the step runs, :func:`as_on_cuda` makes the networks choose what they would on a GPU (an
:class:`~trgl_pipe.models.heads.AveragePool` takes its exact kernel where the map divides).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# torch's documented entries ("will throw a RuntimeError when mode=True") → the ATen operations
# that raise on CUDA. Entries that cannot occur in a training step of an image network still have
# their operations listed, so a user's network or objective that uses them is reported too.
CUDA_THROWS: dict[str, tuple[str, ...]] = {
    "torch.nn.AvgPool3d": ("avg_pool3d_backward",),
    "torch.nn.AdaptiveAvgPool2d": ("_adaptive_avg_pool2d_backward",),
    "torch.nn.AdaptiveAvgPool3d": ("_adaptive_avg_pool3d_backward",),
    "torch.nn.AdaptiveMaxPool2d": ("adaptive_max_pool2d_backward",),
    "torch.nn.FractionalMaxPool2d": ("fractional_max_pool2d_backward",),
    "torch.nn.FractionalMaxPool3d": ("fractional_max_pool3d_backward",),
    "torch.nn.MaxUnpool1d": ("max_unpool2d",),
    "torch.nn.MaxUnpool2d": ("max_unpool2d",),
    "torch.nn.MaxUnpool3d": ("max_unpool3d",),
    "torch.nn.functional.interpolate": (
        "upsample_linear1d_backward",
        "upsample_bilinear2d_backward",
        "upsample_bicubic2d_backward",
        "upsample_trilinear3d_backward",
        "_upsample_bilinear2d_aa_backward",
        "_upsample_bicubic2d_aa_backward",
    ),
    "torch.nn.ReflectionPad1d": ("reflection_pad1d_backward",),
    "torch.nn.ReflectionPad2d": ("reflection_pad2d_backward",),
    "torch.nn.ReflectionPad3d": ("reflection_pad3d_backward",),
    "torch.nn.NLLLoss": ("nll_loss2d_forward",),
    "torch.nn.CTCLoss": ("_ctc_loss_backward",),
    "torch.nn.EmbeddingBag": ("_embedding_bag_dense_backward", "_embedding_bag_per_sample_weights_backward"),
    "torch.Tensor.put_": ("put_", "put"),
    "torch.histc": ("histc",),
    "torch.bincount": ("bincount",),
    "torch.median": ("median",),
    "torch.nn.functional.grid_sample": ("grid_sampler_2d_backward", "grid_sampler_3d_backward"),
    "torch.Tensor.scatter_reduce": ("scatter_reduce",),
    "torch.Tensor.resize_": (),  # quantized tensors only: never in a training step here
}
_DOC_OF_OP = {op: doc for doc, ops in CUDA_THROWS.items() for op in ops}

_ON_CUDA = contextvars.ContextVar("trgl_pipe_as_on_cuda", default=False)


@contextlib.contextmanager
def as_on_cuda() -> Iterator[None]:
    """Within this context, modules that choose a kernel by device choose as on a GPU with
    deterministic algorithms on (:meth:`AveragePool.forward`)."""
    token = _ON_CUDA.set(True)
    try:
        yield
    finally:
        _ON_CUDA.reset(token)


def deterministic_cuda_choice(x: torch.Tensor) -> bool:
    """Whether ``x`` is computed as on a GPU under deterministic algorithms (really or in an audit)."""
    return _ON_CUDA.get() or (x.is_cuda and torch.are_deterministic_algorithms_enabled())


@dataclass(frozen=True)
class Finding:
    """One operation without a deterministic CUDA kernel, the network that ran it, torch's entry."""

    network: str
    op: str
    documented_as: str

    def __str__(self) -> str:
        return f"{self.network} ({self.documented_as}: {self.op})"


class _Recorder(TorchDispatchMode):
    """Records each ATen operation's name with the network running when its forward was called;
    a backward operation is attributed to the network of its forward (``x_backward`` ← ``x``)."""

    LOSS = "the local loss"

    def __init__(self) -> None:
        super().__init__()
        self.network = self.LOSS
        self.forward_of: dict[str, dict[str, None]] = {}  # forward op -> the networks that ran it
        self.found: dict[tuple[str, str], None] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not name.endswith("_backward"):
            self.forward_of.setdefault(name, {})[self.network] = None
        if name in _DOC_OF_OP:
            forward = name.removesuffix("_backward").removesuffix("_dense")
            ran = self.forward_of.get(forward) or self.forward_of.get(f"_{forward}")
            for network in ran or [self.network]:
                self.found[(network, name)] = None
        return func(*args, **(kwargs or {}))


def audit(step: Callable[[], None], networks: dict[str, nn.Module]) -> list[Finding]:
    """Run ``step`` (forward, loss and backward of one small batch, on the CPU) and return the
    operations it ran that throw on CUDA under deterministic algorithms, each with the name of the
    network in ``networks`` whose forward ran it (or that ran the forward of its backward)."""
    recorder = _Recorder()
    handles = []
    for label, module in networks.items():

        def enter(module, args, label=label):
            recorder.network = label

        def leave(module, args, output):
            recorder.network = recorder.LOSS

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with as_on_cuda(), recorder:
            step()
    finally:
        for handle in handles:
            handle.remove()
    return [Finding(network, op, _DOC_OF_OP[op]) for network, op in recorder.found]
