from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trgl_pipe.config import load_config
from trgl_pipe.models import PostActBlock, PreActBlock, block_shapes, kinetic_energy
from trgl_pipe.models.blocks import PointwiseConv
from trgl_pipe.stage import build_parts


def _resnet(seed: int, *overrides: str):
    return build_parts(load_config(None, [f"seed={seed}", *overrides]), (3, 32, 32), 10)


def test_kinetic_energy_by_hand() -> None:
    r = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 0.0]]]])  # two samples with 2 features each
    # sample norms²: 1 + 4 = 5 and 9 + 0 = 9; batch mean = 7
    assert kinetic_energy(r).item() == pytest.approx(7.0)
    assert kinetic_energy(r, "mean").item() == pytest.approx(3.5)  # per-feature mean


def test_preact_identity_block_output_is_input_plus_residual() -> None:
    block = PreActBlock(4, 4).eval()
    x = torch.randn(3, 4, 8, 8)
    out, (r,) = block(x)
    torch.testing.assert_close(out, x + r, rtol=0, atol=0)


def test_downsampling_block_returns_the_residual_branch_not_the_difference() -> None:
    block = PreActBlock(4, 8, stride=2).eval()
    x = torch.randn(2, 4, 8, 8)
    out, (r,) = block(x)
    pre = F.relu(block.bn1(x))
    expected_r = block.conv2(F.relu(block.bn2(block.conv1(pre))))
    torch.testing.assert_close(r, expected_r)
    torch.testing.assert_close(out, block.shortcut(pre) + r)
    assert r.shape == (2, 8, 4, 4)


@pytest.mark.parametrize("size", [8, 7])
def test_pointwise_conv_is_the_strided_1x1_convolution(size: int) -> None:
    # Subsampling then a unit-stride 1x1 convolution: the same output and gradients as the strided
    # 1x1 convolution it replaces (which oneDNN's AVX2 backward corrupts memory with; even and odd sizes)
    conv = PointwiseConv(4, 8, stride=2).double()
    assert list(conv.state_dict()) == ["weight"]
    x = torch.randn(3, 4, size, size, dtype=torch.double, requires_grad=True)
    out = conv(x)
    expected = F.conv2d(x, conv.weight, stride=2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, conv.weight], g)
    want = torch.autograd.grad(expected, [x, conv.weight], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_postact_block_applies_relu_after_the_sum() -> None:
    block = PostActBlock(4, 4).eval()
    x = torch.randn(2, 4, 6, 6)
    out, (r,) = block(x)
    torch.testing.assert_close(out, F.relu(x + r))


@pytest.mark.parametrize(("depth", "blocks"), [(8, 3), (20, 9), (32, 15), (56, 27), (110, 54)])
def test_resnet_depth_gives_3n_blocks(depth: int, blocks: int) -> None:
    shapes = block_shapes(depth, 16)
    assert len(shapes) == blocks
    assert [s.stride for s in shapes].count(2) == 2
    assert shapes[-1].out_channels == 64


def test_weights_do_not_depend_on_anything_but_the_seed() -> None:
    a = _resnet(5, "model.width=8")
    b = _resnet(5, "model.width=8")
    c = _resnet(6, "model.width=8")
    for x, y, z in zip(a.blocks, b.blocks, c.blocks, strict=True):
        wx, wy, wz = x.conv1.weight, y.conv1.weight, z.conv1.weight
        assert torch.equal(wx, wy)
        assert not torch.equal(wx, wz)


@pytest.mark.parametrize("block_cls", [PreActBlock, PostActBlock])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_energy_has_the_gradients_of_the_plain_formula(block_cls, reduction: str) -> None:
    torch.manual_seed(0)
    block = block_cls(3, 6, stride=2).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.double, requires_grad=True)
    w = torch.randn(4, 6, 4, 4, dtype=torch.double)

    def plain(x):
        out, (r,) = block(x)
        return (out * w).sum() + 0.3 * kinetic_energy(r, reduction)

    def fused(x):
        out, energy = block.forward_with_energy(x, reduction)
        return (out * w).sum() + 0.3 * energy

    torch.testing.assert_close(plain(x), fused(x))
    g_plain = torch.autograd.grad(plain(x), [x, *block.parameters()])
    g_fused = torch.autograd.grad(fused(x), [x, *block.parameters()])
    for a, b in zip(g_plain, g_fused, strict=True):
        torch.testing.assert_close(a, b)
    block.eval()  # fixed BatchNorm statistics: a function of x alone, as gradcheck needs
    assert torch.autograd.gradcheck(fused, (x,))
