"""User networks: an MLP on flattened images, a ResNet from ``trgl_pipe.Residual``, torchvision's
MobileNetV2 features cut into their inverted-residual blocks, and a small ViT."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

import trgl_pipe


def mlp(
    input_shape: tuple[int, int, int], num_classes: int, width: int = 32, depth: int = 3
) -> nn.Sequential:
    """Plain blocks: the first changes the shape (no transport cost), the others keep it."""
    c, h, w = input_shape
    first = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, width), nn.ReLU())
    return nn.Sequential(
        first, *(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth - 1))
    )


class PadShortcut(nn.Module):
    """Subsample by the stride, then append zero channels (the original CIFAR ResNet's shortcut)."""

    def __init__(self, extra: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = extra, stride

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(x, kernel_size=1, stride=self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


def resnet(
    input_shape: tuple[int, int, int], num_classes: int, depth: int = 8, width: int = 4
) -> trgl_pipe.Network:
    """A pre-activation CIFAR ResNet with the parameter-free shortcut, from ``Residual`` blocks."""
    n = (depth - 2) // 6
    blocks = []
    in_ch = width
    for stage, out_ch in enumerate((width, 2 * width, 4 * width)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            branch = nn.Sequential(
                nn.BatchNorm2d(in_ch),
                nn.ReLU(),
                nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(),
                nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False),
            )
            shortcut = PadShortcut(out_ch - in_ch, stride) if stride != 1 or in_ch != out_ch else None
            blocks.append(trgl_pipe.Residual(branch, shortcut))
            in_ch = out_ch
    stem = nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False)
    head = nn.Sequential(
        nn.BatchNorm2d(in_ch), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes)
    )
    return trgl_pipe.Network(stem=stem, blocks=blocks, head=head)


def mobilenet_v2(
    input_shape: tuple[int, int, int], num_classes: int, width_mult: float = 0.25
) -> trgl_pipe.Network:
    """torchvision's MobileNetV2: each inverted-residual block with a skip becomes a ``Residual``
    of its ``conv`` branch; the others (and the last 1x1 convolution) are plain blocks."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    first = model.features[0][0]
    model.features[0][0] = nn.Conv2d(input_shape[0], first.out_channels, 3, 2, 1, bias=False)
    blocks: list[nn.Module] = []
    for layer in model.features[1:]:
        if isinstance(layer, InvertedResidual) and layer.use_res_connect:
            blocks.append(trgl_pipe.Residual(layer.conv))
        else:
            blocks.append(layer)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), *model.classifier)
    return trgl_pipe.Network(stem=model.features[0], blocks=blocks, head=head)


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int, num_patches: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, num_patches, dim))
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class EncoderBlock(nn.Module):
    """A pre-norm transformer block that returns ``(output, [attention, mlp])``: the protocol."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        h = self.norm1(x)
        r1 = self.attn(h, h, h, need_weights=False)[0]
        x = x + r1
        r2 = self.mlp(self.norm2(x))
        return x + r2, [r1, r2]


def vit(
    input_shape: tuple[int, int, int], num_classes: int, dim: int = 16, depth: int = 4, patch: int = 7
) -> trgl_pipe.Network:
    """A small ViT on tokens [N, L, D] with no classifier of its own: every module gets the token head."""
    c, h, w = input_shape
    stem = PatchEmbed(c, dim, patch, (h // patch) * (w // patch))
    return trgl_pipe.Network(stem=stem, blocks=[EncoderBlock(dim, 2) for _ in range(depth)])


SEEN_HEAD_SHAPES: list[tuple[int, ...]] = []


def linear_head(shape: tuple[int, ...], num_classes: int, module: int, num_modules: int) -> nn.Module:
    """An auxiliary head builder (``aux.head``): flatten whatever the module gives, then linear."""
    SEEN_HEAD_SHAPES.append(tuple(shape))
    features = 1
    for n in shape:
        features *= n
    return nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes))


# -- mistakes, for the tests of bad input ----------------------------------------------------


def returns_a_list(input_shape: tuple[int, int, int], num_classes: int) -> list[nn.Module]:
    return [nn.Linear(4, 4)]


def five_d(input_shape: tuple[int, int, int], num_classes: int) -> trgl_pipe.Network:
    """Blocks whose outputs are [N, 1, C, H, W]: no built-in head takes them."""
    return trgl_pipe.Network(stem=nn.Unflatten(1, (1, input_shape[0])), blocks=[nn.Tanh(), nn.Tanh()])


def rank_dependent(input_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """A builder that reads the rank: the ranks of a pipeline get different networks."""
    import os

    width = 8 + int(os.environ.get("RANK", "0"))
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], width)),
        nn.Sequential(nn.Linear(width, width), nn.ReLU()),
    )


def _checked_width(width: int) -> int:
    if width % 3:
        raise ValueError(f"width {width} is not a multiple of 3")
    return width


def raises(input_shape: tuple[int, int, int], num_classes: int, width: int = 4) -> nn.Sequential:
    """A builder with a bug of its own: it raises two frames down."""
    return mlp(input_shape, num_classes, width=_checked_width(width))


class _Wobbly(nn.Module):
    """A block whose output has one more feature at every call (a bug: state in the shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return torch.cat([x, x[:, : self.calls]], dim=1)


def wobbly(input_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """A flattened input, then a block whose output shape changes from call to call."""
    return nn.Sequential(nn.Flatten(), _Wobbly(), nn.Linear(1, 1))
