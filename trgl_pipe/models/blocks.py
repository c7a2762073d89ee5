"""Transport blocks: blocks that return their output *and* what the kinetic energy is taken of.

Every block of every backbone answers two calls:

- ``block(x) -> (out, residuals)``: the block's output and the list of its residual branches r
  (one for a ResNet block, two for a Swin block, none for a block that changes the feature space
  without a skip, like Swin's patch merging);
- ``block.forward_with_energy(x, reduction) -> (out, energy)``: the output and the summed kinetic
  energy of those residuals, differentiable and fused (one pass over r in backward).

Returning r lets the local objective add ‖r‖² without forward hooks. For a block that changes
shape (stride 2 or more channels) the output is ``shortcut(x) + r`` and r is still the residual
branch, not ``output - x``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _accumulation_dtype(r: Tensor) -> Tensor:
    """float32 for half-precision residuals (bf16 autocast), the residual's own dtype otherwise."""
    return r.to(torch.promote_types(r.dtype, torch.float32))


def energy_divisor(r: Tensor, reduction: str) -> int:
    """``sum``: the batch size (mean over samples of Σ r²); ``mean``: every element (mean of r²)."""
    return r.numel() if reduction == "mean" else r.shape[0]


# Elements per partial sum of squares. One long float32 dot product over 10^6-10^7 squares loses
# 1e-6 to 6e-5 of the result (relative to float64); partial dots of 1024 elements, added in
# float64, lose about 1e-9 (fp32 residuals) to 3e-8 (bf16 ones), less than torch.mean(r**2), at
# about the speed of one dot (benchmarks/kinetic_precision.py measures both).
_CHUNK = 1024


def sum_of_squares(flat: Tensor) -> Tensor:
    """Σ flat² of a 1-D float tensor, in its dtype: partial dots of ``_CHUNK`` elements, added in float64.

    One batched matrix product computes the partial dots (a single read of the data, no
    temporary of its size); only the n / 1024 partial sums are added, in float64. Autocast is
    off here: under bf16 autocast the batched product would otherwise run in bf16.
    """
    n = flat.numel()
    k = n // _CHUNK
    if torch.compiler.is_exporting():
        # an exported classifier discards the energy, and chunks of a batch-dependent count
        # would tie the exported batch size to multiples of 1024 elements
        return torch.dot(flat, flat)
    device = flat.device.type
    off = torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else contextlib.nullcontext()
    with off:
        if k <= 1:
            return torch.dot(flat, flat)
        rows = flat[: k * _CHUNK].view(k, 1, _CHUNK)
        total = torch.bmm(rows, rows.transpose(1, 2)).sum(dtype=torch.float64)
        if k * _CHUNK < n:
            tail = flat[k * _CHUNK :]
            total = total + torch.dot(tail, tail).double()
        return total.to(flat.dtype)


def kinetic_energy(r: Tensor, reduction: str = "sum") -> Tensor:
    """Batch mean of the squared L2 norm of each sample's residual: mean_b Σ_features r².

    ``sum`` (default) keeps ‖r‖² the squared Euclidean displacement of the paper; the mean over
    the batch makes the term independent of the batch size, like the cross-entropy.
    ``mean`` divides by every element instead (torch.mean(r²), the authors' reduction), so one τ
    suits every resolution and width.
    """
    # Σ_b Σ_f r² / B equals mean_b Σ_f r²: one reduction over the whole batch, one elementwise
    # pass in backward.
    return sum_of_squares(_accumulation_dtype(r).reshape(-1)) / max(1, energy_divisor(r, reduction))


class _SumWithKinetic(torch.autograd.Function):
    """``skip + r`` and the kinetic energy of r; backward touches r once (one fused pass).

    Autograd of ``skip + r`` plus ``mean(r**2)`` makes three passes over r in backward (two
    products and an accumulation); here the residual's gradient is ``r * (2 g_e / d) + g``, with
    every rounding of that autograd: ``g_e / d`` first, then the exact doubling, the product
    rounded before the sum (not addcmul, whose fused multiply-add rounds once). So the gradients
    are those of ``skip + r`` and ``mean(r**2)``, bit for bit, and the authors' code and this one
    take the same steps.
    """

    @staticmethod
    def forward(ctx, skip: Tensor, r: Tensor, divisor: int) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(r)
        ctx.divisor = divisor
        return skip + r, sum_of_squares(_accumulation_dtype(r).reshape(-1)) / divisor

    @staticmethod
    def backward(ctx, g_sum: Tensor, g_energy: Tensor) -> tuple[Tensor, Tensor, None]:
        (r,) = ctx.saved_tensors
        scale = ((g_energy / ctx.divisor) * 2.0).to(r.dtype)
        return g_sum, torch.mul(r, scale).add_(g_sum), None


def add_with_energy(skip: Tensor, r: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    """``skip + r`` and the kinetic energy of r (fused, differentiable)."""
    return _SumWithKinetic.apply(skip, r, max(1, energy_divisor(r, reduction)))


class TransportBlock(nn.Module):
    """A block whose output and residual branches are both visible (see the module docstring)."""

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError

    def forward_with_energy(self, x: Tensor, reduction: str = "sum") -> tuple[Tensor, Tensor]:
        out, residuals = self(x)
        energy = x.new_zeros((), dtype=torch.float32)
        for r in residuals:
            energy = energy + kinetic_energy(r, reduction)
        return out, energy


class ResidualBlock(TransportBlock):
    """A block ``combine(skip(x) + r(x))``; subclasses define the two branches and combine."""

    def branches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def combine(self, s: Tensor) -> Tensor:
        return s

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        skip, r = self.branches(x)
        return self.combine(skip + r), [r]

    def forward_with_energy(self, x: Tensor, reduction: str = "sum") -> tuple[Tensor, Tensor]:
        """The output and the kinetic energy of r (see :func:`kinetic_energy`), differentiable."""
        skip, r = self.branches(x)
        s, energy = add_with_energy(skip, r, reduction)
        return self.combine(s), energy


class PointwiseConv(nn.Conv2d):
    """A 1×1 convolution whose stride is applied by subsampling first: ``conv1x1(x[..., ::s, ::s])``.

    The same parameters (state_dict keys of ``nn.Conv2d``) and the same function: a strided 1×1
    kernel reads exactly the pixels the subsampling keeps. Why not ``nn.Conv2d(stride=s)``: on CPUs
    where oneDNN runs its AVX2 kernels (AMD EPYC without AVX-512, among others), the backward of a
    strided 1×1 convolution on channels_last input with fewer than 8 input channels writes past its
    workspace (heap corruption: SIGABRT, SIGBUS, hangs or wrong weight gradients). torch.compile
    picks channels_last on its own, so a compiled narrow ResNet met it. The unit-stride form never
    reaches that kernel. See docs/known-issues.md.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        sh, sw = self.stride
        if sh != 1 or sw != 1:
            x = x[:, :, ::sh, ::sw]
        return F.conv2d(x, self.weight, self.bias)


class PadShortcut(nn.Module):
    """The parameter-free downsampling shortcut of the original CIFAR ResNet and of the authors'
    code: average pooling with kernel 1 and the block's stride (the pixels a strided 1×1
    convolution reads), then zero channels appended up to the block's width."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = F.avg_pool2d(x, kernel_size=1, stride=self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


def downsampling_shortcut(
    kind: str, in_channels: int, out_channels: int, stride: int, batchnorm: bool
) -> nn.Module | None:
    """None for an identity shortcut; else a 1×1 convolution (``conv``, with BatchNorm for the
    post-activation block) or the parameter-free pool-and-pad shortcut (``pad``)."""
    if stride == 1 and in_channels == out_channels:
        return None
    if kind == "pad":
        return PadShortcut(in_channels, out_channels, stride)
    conv = PointwiseConv(in_channels, out_channels, stride)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels)) if batchnorm else conv


class PreActBlock(ResidualBlock):
    """Pre-activation block (He et al., 2016b): x_{m+1} = shortcut(x_m) + r(x_m), exactly.

    Its output is the transported point itself, which matches the paper's φ_{m+1} = φ_m + r_m(φ_m).
    The 1×1 convolution shortcut reads the pre-activated input; the pad shortcut reads x.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "conv") -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut = downsampling_shortcut(shortcut, in_channels, out_channels, stride, batchnorm=False)

    def branches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = F.relu(self.bn1(x))
        if self.shortcut is None:
            skip = x
        else:
            skip = self.shortcut(x if isinstance(self.shortcut, PadShortcut) else pre)
        return skip, self.conv2(F.relu(self.bn2(self.conv1(pre))))


class PostActBlock(ResidualBlock):
    """Original CIFAR block (He et al., 2016a): out = relu(shortcut(x) + r(x)).

    The ReLU after the sum means out - x is not r; the kinetic energy uses r, the residual branch.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "conv") -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = downsampling_shortcut(shortcut, in_channels, out_channels, stride, batchnorm=True)

    def branches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip, self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def combine(self, s: Tensor) -> Tensor:
        return F.relu(s)
