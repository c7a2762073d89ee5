"""Residual blocks that return their output *and* their residual branch r.

Returning r lets the local objective add the kinetic energy ‖r‖² without forward hooks.
For a block that changes shape (stride 2 or more channels) the output is
``shortcut(x) + r`` and r is still the residual branch, not ``output - x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


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


def _accumulation_dtype(r: Tensor) -> Tensor:
    """float32 for half-precision residuals (bf16 autocast), the residual's own dtype otherwise."""
    return r.to(torch.promote_types(r.dtype, torch.float32))


class _SumWithKinetic(torch.autograd.Function):
    """``skip + r`` and the kinetic energy of r; backward touches r once (one fused pass).

    Autograd of ``skip + r`` plus ``dot(r, r)`` would make three passes over r in backward (two
    products and an accumulation); here the residual's gradient is ``addcmul(g, r, 2 g_e / d)``.
    """

    @staticmethod
    def forward(ctx, skip: Tensor, r: Tensor, divisor: int) -> tuple[Tensor, Tensor]:
        flat = _accumulation_dtype(r).reshape(-1)
        ctx.save_for_backward(r)
        ctx.divisor = divisor
        return skip + r, torch.dot(flat, flat) / divisor

    @staticmethod
    def backward(ctx, g_sum: Tensor, g_energy: Tensor) -> tuple[Tensor, Tensor, None]:
        (r,) = ctx.saved_tensors
        scale = (g_energy * (2.0 / ctx.divisor)).to(r.dtype)
        return g_sum, torch.addcmul(g_sum, r, scale), None


class ResidualBlock(nn.Module):
    """A block is ``combine(skip(x) + r(x))``; subclasses define the two branches and combine."""

    def branches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def combine(self, s: Tensor) -> Tensor:
        return s

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        skip, r = self.branches(x)
        return self.combine(skip + r), r

    def forward_with_energy(self, x: Tensor, reduction: str = "sum") -> tuple[Tensor, Tensor]:
        """The output and the kinetic energy of r (see :func:`kinetic_energy`), differentiable."""
        skip, r = self.branches(x)
        divisor = r.numel() if reduction == "mean" else r.shape[0]
        s, energy = _SumWithKinetic.apply(skip, r, divisor)
        return self.combine(s), energy


class PreActBlock(ResidualBlock):
    """Pre-activation block (He et al., 2016b): x_{m+1} = shortcut(x_m) + r(x_m), exactly.

    Its output is the transported point itself, which matches the paper's φ_{m+1} = φ_m + r_m(φ_m).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = PointwiseConv(in_channels, out_channels, stride)

    def branches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        return skip, self.conv2(F.relu(self.bn2(self.conv1(pre))))


class PostActBlock(ResidualBlock):
    """Original CIFAR block (He et al., 2016a): out = relu(shortcut(x) + r(x)).

    The ReLU after the sum means out - x is not r; the kinetic energy uses r, the residual branch.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                PointwiseConv(in_channels, out_channels, stride),
                nn.BatchNorm2d(out_channels),
            )

    def branches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip, self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def combine(self, s: Tensor) -> Tensor:
        return F.relu(s)


def kinetic_energy(r: Tensor, reduction: str = "sum") -> Tensor:
    """Batch mean of the squared L2 norm of each sample's residual: mean_b Σ_{c,h,w} r².

    ``sum`` (default) keeps ‖r‖² the squared Euclidean displacement of the paper; the mean over
    the batch makes the term independent of the batch size, like the cross-entropy.
    ``mean`` divides by the number of features C·H·W, so one τ suits every resolution and width.
    """
    # One dot product over the whole batch: Σ_b Σ_f r² / B equals mean_b Σ_f r², and it is the
    # cheapest way to get there (one reduction, one elementwise pass in backward).
    flat = _accumulation_dtype(r).reshape(-1)
    total = torch.dot(flat, flat)
    return total / (r.numel() if reduction == "mean" else r.shape[0])


def init_weights(module: nn.Module) -> None:
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
