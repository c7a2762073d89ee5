"""The paper's backbones built on torchvision: same function as torchvision, residuals exposed."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.swin_transformer import SwinTransformer

from trgl_pipe.config import load_config
from trgl_pipe.errors import ConfigError
from trgl_pipe.models.swin import VARIANTS
from trgl_pipe.stage import ModuleBody, build_parts


def _backbone(arch: str, image: int, *overrides: str):
    cfg = load_config(None, [f"model.arch={arch}", "model.num_modules=4", *overrides])
    return cfg, build_parts(cfg, (3, image, image), 10)


def _composition(parts, x: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """G_K: module after module, each a ModuleBody over its blocks (the stem with module 0)."""
    bounds = [0, *cuts, parts.num_blocks]
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        body = ModuleBody(parts.stem if i == 0 else None, parts.blocks[a:b], a).eval()
        x, _ = body(x, kinetic_grad=False)
    return x


def _torchvision(arch: str, image: int) -> torch.nn.Module:
    """The same network from torchvision, with the same weights (same seed, same constructor)."""
    from trgl_pipe.models.init import fork_seeded

    with fork_seeded(0, 0):
        if arch.startswith("swin"):
            embed, depths, heads, drop = VARIANTS[arch]
            return SwinTransformer(
                [2, 2], embed, depths, heads, [2, 2], stochastic_depth_prob=drop, num_classes=10
            )
        return getattr(torchvision.models, arch)(weights=None, num_classes=10)


def _feature_path(model: torch.nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    if arch.startswith("resnet"):
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        return model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return model.features(x)


@pytest.mark.parametrize(
    ("arch", "image", "extra"),
    [
        ("resnet18", 32, []),
        ("resnet50", 32, []),
        ("resnet152", 32, []),
        ("vgg19_bn", 32, []),
        ("swin_t", 32, ["model.patch_size=2", "model.window_size=2"]),
    ],
)
def test_the_modules_compose_to_torchvision_feature_path(arch: str, image: int, extra: list[str]) -> None:
    _, parts = _backbone(arch, image, *extra)
    reference = _torchvision(arch, image).eval()
    x = torch.randn(2, 3, image, image)
    with torch.no_grad():
        expected = _feature_path(reference, arch, x)
        n = parts.num_blocks
        got = _composition(parts, x, [n // 4, n // 2, 3 * n // 4])
        assert torch.equal(got, expected)
        # and the whole network, head included
        assert torch.equal(parts.head.eval()(got), reference(x))


@pytest.mark.parametrize(
    ("arch", "image", "extra", "residuals"),
    [
        ("resnet18", 32, [], 8),
        ("resnet50", 32, [], 16),
        ("vgg11_bn", 32, [], 1),  # VGG-11: only its 7th unit (512 -> 512) keeps width and resolution
        ("vgg19_bn", 32, [], 7),
        ("swin_t", 32, ["model.patch_size=2", "model.window_size=2"], 24),
    ],
)
def test_the_kinetic_term_reaches_every_block_it_measures(
    arch: str, image: int, extra: list[str], residuals: int
) -> None:
    _, parts = _backbone(arch, image, *extra)
    x = torch.randn(2, 3, image, image)
    h = parts.stem(x) if parts.stem is not None else x
    counted = 0
    for block in parts.blocks:
        block.train()
        torch.manual_seed(1)  # the same stochastic-depth draws in both calls (Swin)
        out, rs = block(h)
        counted += len(rs)
        torch.manual_seed(1)
        _, energy = block.forward_with_energy(h, "sum")
        if rs:
            (grads,) = [
                torch.autograd.grad(
                    energy, [p for p in block.parameters() if p.requires_grad], allow_unused=True
                )
            ]
            assert any(g is not None and g.abs().sum() > 0 for g in grads), type(block).__name__
            expected = sum(float((r.detach().double() ** 2).sum()) / r.shape[0] for r in rs)
            assert float(energy) == pytest.approx(expected, rel=1e-4)
        else:
            assert float(energy) == 0.0
        h = out.detach()
    assert counted == residuals


def test_swin_refuses_windows_that_do_not_divide_a_stage() -> None:
    with pytest.raises(ConfigError, match=r"swin_t: stage 4 works on 1x1 tokens, which model.window_size=2"):
        _backbone("swin_t", 32, "model.patch_size=4", "model.window_size=2")
    with pytest.raises(ConfigError, match=r"model\.patch_size=5 does not divide the 32x32 images"):
        _backbone("swin_t", 32, "model.patch_size=5")


def test_presets_are_the_authors_k4_splits() -> None:
    assert _backbone("resnet101", 32)[1].presets[4] == [7, 9, 9, 8]
    assert _backbone("resnet152", 32)[1].presets[4] == [11, 13, 13, 13]
    # Swin-T: one stage per module; each stage's patch merging goes with it
    assert _backbone("swin_t", 32, "model.patch_size=2", "model.window_size=2")[1].presets[4] == [2, 3, 7, 3]


def test_a_torchvision_state_dict_is_the_starting_point(tmp_path: Path) -> None:
    source = torchvision.models.resnet18(weights=None, num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pt")
    _, parts = _backbone("resnet18", 32, f"model.init_from={tmp_path / 'resnet18.pt'}")
    assert torch.equal(parts.stem[0].weight, source.conv1.weight)
    assert torch.equal(parts.blocks[-1].block.conv2.weight, source.layer4[1].conv2.weight)
    assert parts.head.layers[-1].weight.shape == (10, 512)  # the 1000-class fc was left out
    torch.save({"not.a.key": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="1 keys are not in this model"):
        _backbone("resnet18", 32, f"model.init_from={tmp_path / 'other.pt'}")


def test_small_input_resnets_keep_the_resolution_of_the_stem() -> None:
    _, normal = _backbone("resnet50", 64)
    _, small = _backbone("resnet50", 64, "model.small_input=true")
    assert normal.stem_shape == (64, 16, 16) and small.stem_shape == (64, 32, 32)
    assert small.shapes[-1] == (2048, 4, 4)


def test_a_cifar_resnet_run_does_not_import_torchvision() -> None:
    # Importing torchvision costs every process 1.2 s of start-up on a 2-core CPU (it loads
    # torch._dynamo): a run of the default backbone builds its stages without it, and a swin
    # backbone's stochastic depth is still seen as random (tests/test_random_stream.py).
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from trgl_pipe.config import load_config\n"
        "from trgl_pipe.context import build_context\n"
        "import trgl_pipe.run, trgl_pipe.training.rank\n"
        "ctx = build_context(load_config('configs/quickstart.yaml', []), torch.device('cpu'))\n"
        "[ctx.build_stage(k) for k in range(ctx.num_modules)]\n"
        "print(sorted(m for m in sys.modules if m.startswith('torchvision'))[:3])\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout
