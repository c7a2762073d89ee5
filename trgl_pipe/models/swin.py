"""torchvision's Swin Transformer (Swin-T, -S, -B) as transport blocks, for small images too.

Built by torchvision's ``SwinTransformer`` with the patch and window sizes of the config
(``model.patch_size``, ``model.window_size``), so the image size need not be 224: the authors
train Swin-T on 32×32 and 96×96 images. Every Swin block has two residual branches, attention
and MLP (each after its LayerNorm and stochastic depth), and both are counted in the kinetic
energy; the patch embedding (the stem) and the patch-merging layers between stages are blocks
without a residual and pay nothing. The head is torchvision's: LayerNorm → average pool → linear.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torchvision.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock

from trgl_pipe.errors import ConfigError
from trgl_pipe.models.backbone import initial_weights, register
from trgl_pipe.models.blocks import TransportBlock, add_with_energy
from trgl_pipe.models.heads import TorchvisionHead
from trgl_pipe.models.init import fork_seeded
from trgl_pipe.models.torchvision_resnet import adapt_input_channels
from trgl_pipe.models.user import Network

# torchvision's variants: embedding width, blocks per stage, heads per stage, stochastic depth
VARIANTS = {
    "swin_t": (96, [2, 2, 6, 2], [3, 6, 12, 24], 0.2),
    "swin_s": (96, [2, 2, 18, 2], [3, 6, 12, 24], 0.3),
    "swin_b": (128, [2, 2, 18, 2], [4, 8, 16, 32], 0.5),
}


class SwinBlock(TransportBlock):
    """``x + r1(x)`` then ``+ r2(·)``: attention and MLP branches, both exposed."""

    def __init__(self, block: SwinTransformerBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        b = self.block
        r1 = b.stochastic_depth(b.attn(b.norm1(x)))
        x = x + r1
        r2 = b.stochastic_depth(b.mlp(b.norm2(x)))
        return x + r2, [r1, r2]

    def forward_with_energy(self, x: Tensor, reduction: str = "sum") -> tuple[Tensor, Tensor]:
        b = self.block
        x, e1 = add_with_energy(x, b.stochastic_depth(b.attn(b.norm1(x))), reduction)
        x, e2 = add_with_energy(x, b.stochastic_depth(b.mlp(b.norm2(x))), reduction)
        return x, e1 + e2


class PatchMergingBlock(TransportBlock):
    """Swin's patch merging between stages: no skip, no residual, no cost."""

    def __init__(self, merge: PatchMerging) -> None:
        super().__init__()
        self.merge = merge

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.merge(x), []


def check_image_size(image_size: int, patch: int, window: int, arch: str) -> None:
    """One line for an image the backbone cannot take without padding its windows."""
    if image_size % patch:
        raise ConfigError(
            f"{arch}: model.patch_size={patch} does not divide the {image_size}x{image_size} images; "
            "choose a patch size that divides the image size"
        )
    resolution = image_size // patch
    for stage in range(4):
        if resolution < 1 or resolution % window:
            raise ConfigError(
                f"{arch}: stage {stage + 1} works on {resolution}x{resolution} tokens, which "
                f"model.window_size={window} does not divide ({image_size}x{image_size} images, "
                f"patch {patch}); choose a window size that divides every stage's resolution "
                f"({image_size // patch} halved three times)"
            )
        resolution //= 2


@register("swin_t", "swin_s", "swin_b")
def torchvision_swin(cfg: Any, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> Network:
    embed, depths, heads, depth_drop = VARIANTS[cfg.arch]
    check_image_size(input_shape[1], cfg.patch_size, cfg.window_size, cfg.arch)
    drop = depth_drop if cfg.stochastic_depth is None else cfg.stochastic_depth
    with fork_seeded(seed, 0):
        model = SwinTransformer(
            patch_size=[cfg.patch_size, cfg.patch_size],
            embed_dim=embed,
            depths=depths,
            num_heads=heads,
            window_size=[cfg.window_size, cfg.window_size],
            stochastic_depth_prob=drop,
            num_classes=num_classes,
        )
        model.features[0][0] = adapt_input_channels(model.features[0][0], input_shape[0])
    initial_weights(model, cfg)
    blocks: list[nn.Module] = []
    per_module = []
    for stage in model.features[1:]:
        if isinstance(stage, PatchMerging):
            blocks.append(PatchMergingBlock(stage))
            per_module.append(1)
        else:
            blocks.extend(SwinBlock(b) for b in stage)
            per_module[-1:] = [(per_module[-1] if per_module else 0) + len(stage)]
    head = TorchvisionHead(model.norm, model.permute, model.avgpool, model.head, flatten_at=3)
    # K=4: one stage per module (a stage's patch merging goes with it), as in the authors' code
    return Network(stem=model.features[0], blocks=blocks, head=head, tokens=True, presets={4: per_module})
