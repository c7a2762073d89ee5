"""Classifiers F_k: auxiliary heads of the modules, and the networks' own heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trgl_pipe.models.determinism import deterministic_cuda_choice


class AveragePool(nn.Module):
    """``nn.AdaptiveAvgPool2d(size)`` that stays usable under ``train.deterministic`` on CUDA.

    The adaptive pool has no deterministic CUDA backward. Where the map divides evenly into
    ``size``×``size`` bins, ``avg_pool2d`` with kernel = stride = map/size computes the same means
    and has one; it is used there when deterministic algorithms are on and the input is on a GPU
    (elsewhere the adaptive pool runs, so CPU and non-deterministic results stay bit for bit what
    they were). ``exact_for(h, w)`` says whether a map can be pooled that way.
    """

    def __init__(self, size: int | tuple[int, int]) -> None:
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def exact_for(self, h: int, w: int) -> bool:
        """Whether each side divides into its bins (mean pooling) or they into it (each bin one
        element: VGG's 7×7 pool of a 1×1 map, a copy)."""
        (bh, bw) = self.size
        pooled = h >= bh and w >= bw and h % bh == 0 and w % bw == 0
        copied = h <= bh and w <= bw and bh % h == 0 and bw % w == 0
        return pooled or copied

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if deterministic_cuda_choice(x) and self.exact_for(h, w):
            (bh, bw) = self.size
            if h >= bh and w >= bw:
                return F.avg_pool2d(x, (h // bh, w // bw))
            if h <= bh and w <= bw:  # repeat_interleave has a deterministic CUDA backward
                return x.repeat_interleave(bh // h, dim=-2).repeat_interleave(bw // w, dim=-1)
        return F.adaptive_avg_pool2d(x, self.size)


def deterministic_pools(module: nn.Module) -> nn.Module:
    """``module`` with each ``nn.AdaptiveAvgPool2d`` replaced by an :class:`AveragePool` (torchvision
    heads); no parameters change, so state dicts stay the same."""
    for name, child in module.named_children():
        if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size is not None:
            setattr(module, name, AveragePool(child.output_size))  # type: ignore[arg-type]
        else:
            deterministic_pools(child)
    return module


class AuxHead(nn.Module):
    """Auxiliary classifier of a CNN feature map (DGL's, and the authors' "1CNN" head):
    3×3 conv → ReLU → average pool → BatchNorm → linear.

    The pool either brings the map to ``pool_size``×``pool_size`` (adaptive) or, with
    ``pool_kernel``, is the authors' ``AvgPool2d(kernel)`` (the map shrinks by that factor).
    ``hidden > 0`` puts a hidden layer (linear → ReLU) before the output layer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pool_size: int = 2,
        channels: int | None = None,
        hidden: int = 0,
        pool_kernel: int | None = None,
        spatial: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        channels = channels or in_channels
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        if pool_kernel:
            if spatial is None:
                raise ValueError("a pooling kernel needs the feature map's size")
            self.pool: nn.Module = nn.AvgPool2d(pool_kernel)
            out_h, out_w = spatial[0] // pool_kernel, spatial[1] // pool_kernel
        else:
            self.pool = AveragePool(pool_size)
            out_h = out_w = pool_size
        # can train.deterministic keep this head exact on CUDA? (unknown map size: assume so)
        self.exact_pool = pool_kernel is not None or spatial is None or self.pool.exact_for(*spatial)
        self.spatial = spatial
        self.bn = nn.BatchNorm2d(channels)
        features = channels * out_h * out_w
        if hidden:
            self.fc: nn.Module = nn.Sequential(
                nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
            )
        else:
            self.fc = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.pool(F.relu(self.conv(x))))
        return self.fc(x.flatten(1))


class TokenHead(nn.Module):
    """Auxiliary classifier of tokens [N, L, D] or a Swin feature map [N, H, W, D], as in the
    authors' Swin code: LayerNorm → average over the tokens → linear (``hidden > 0``: linear →
    GELU → linear)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        if hidden:
            self.fc: nn.Module = nn.Sequential(
                nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes)
            )
        else:
            self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x).mean(dim=tuple(range(1, x.dim() - 1))))


class VectorHead(nn.Module):
    """Auxiliary classifier of vectors [N, D]: linear (``hidden > 0``: linear → ReLU → linear)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        if hidden:
            self.fc: nn.Module = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
            )
        else:
            self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class FinalHead(nn.Module):
    """The CIFAR ResNet's own classifier: (BN → ReLU for pre-activation nets) → global pool → linear."""

    def __init__(self, in_channels: int, num_classes: int, preact: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels) if preact else None
        self.pool = AveragePool(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return self.fc(self.pool(x).flatten(1))


class TorchvisionHead(nn.Module):
    """A torchvision model's own classifier: the layers after its feature path, in its order."""

    def __init__(self, *layers: nn.Module, flatten_at: int) -> None:
        super().__init__()
        self.layers = deterministic_pools(nn.ModuleList(layers))
        self.flatten_at = flatten_at  # index of the layer before which the map is flattened

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            if i == self.flatten_at:
                x = torch.flatten(x, 1)
            x = layer(x)
        return x
