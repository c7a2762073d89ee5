"""The authors' knobs: parameter-free shortcut, initialisation, heads, τ convention, presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli

from trgl_pipe.config import load_config
from trgl_pipe.models import AuxHead, FinalHead, PadShortcut, PostActBlock, PreActBlock
from trgl_pipe.objectives.trgl import tau_for_module
from trgl_pipe.stage import StagePlan, build_head, build_parts


def test_the_parameter_free_shortcut_is_pooling_and_zero_channels() -> None:
    x = torch.randn(2, 16, 9, 9)
    out = PadShortcut(16, 32, stride=2)(x)
    by_hand = torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 16, 5, 5)], dim=1)  # kernel-1 pool = subsampling
    assert torch.equal(out, by_hand)
    for block in (PostActBlock(16, 32, 2, shortcut="pad"), PreActBlock(16, 32, 2, shortcut="pad")):
        assert isinstance(block.shortcut, PadShortcut)
        assert not any("shortcut" in name for name, _ in block.named_parameters())
        skip, _ = block.branches(x)
        assert torch.equal(skip, by_hand)  # the pad shortcut reads x itself


def test_orthogonal_initialisation_has_the_asked_gain() -> None:
    cfg = load_config(None, ["model.init=orthogonal", "model.init_gain=0.05", "model.width=8"])
    parts = build_parts(cfg, (3, 32, 32), 10)
    weights = [parts.stem.weight, parts.blocks[4].conv1.weight, parts.head.fc.weight]
    for w in weights:
        rows = w.reshape(w.shape[0], -1)
        singular = torch.linalg.svdvals(rows)
        assert torch.allclose(singular, torch.full_like(singular, 0.05), atol=1e-5), singular[:3]
    assert float(parts.head.fc.bias.detach().abs().max()) == 0
    kaiming = build_parts(load_config(None, ["model.init=kaiming"]), (3, 32, 32), 10)
    std = float(kaiming.head.fc.weight.std())  # the authors' Kaiming covers linear layers: fan-out 10
    assert std == pytest.approx((2 / 10) ** 0.5, rel=0.1)


def test_the_last_module_can_get_an_auxiliary_head_with_its_own_pooling_kernel() -> None:
    cfg = load_config(None, ["model.depth=20", "aux.last=aux", "aux.pool_kernel=[8, 8, 4, 2]"])
    parts = build_parts(cfg, (3, 32, 32), 10)
    last = build_head(parts, StagePlan(3, 4, 6, 9), 10, cfg)
    assert isinstance(last, AuxHead) and last.pool.kernel_size == 2
    assert last.fc.in_features == 64 * 4 * 4  # 8x8 maps pooled by 2
    first = build_head(parts, StagePlan(0, 4, 0, 2), 10, cfg)
    assert first.pool.kernel_size == 8 and first.fc.in_features == 16 * 4 * 4
    own = build_head(parts, StagePlan(3, 4, 6, 9), 10, load_config(None, ["model.depth=20"]))
    assert isinstance(own, FinalHead)


def test_the_authors_tau_convention_needs_no_conversion() -> None:
    ours = [tau_for_module(k, 4, 10.0, "halves") for k in range(4)]
    theirs = [tau_for_module(k, 4, 10.0, "halves", "second") for k in range(4)]
    assert ours == [10.0, 10.0, 20.0, 20.0] and theirs == [5.0, 5.0, 10.0, 10.0]


def test_label_smoothing_reaches_the_loss(tiny) -> None:
    from trgl_pipe.context import build_context

    for smoothing in (0.0, 0.2):
        cfg = tiny("trgl.enabled=false", f"optim.label_smoothing={smoothing}")
        ctx = build_context(cfg, torch.device("cpu"))
        stage = ctx.build_stage(0)
        x, y = next(ctx.batches.train_batches(0))
        with torch.no_grad():
            _, _, logits = stage.local_net(x)
        stage.train_step(x, y)
        assert float(stage.last_loss) == pytest.approx(
            float(F.cross_entropy(logits, y, label_smoothing=smoothing)), rel=1e-5
        )


@pytest.mark.slow
def test_the_stl10_resnet110_preset_is_the_authors_model(tmp_path: Path) -> None:
    # at 96x96x3 inputs, 10 classes, K=4, 1CNN heads with pooling kernels 16, 16, 8, 8
    args = [
        "configs/authors/stl10_resnet110_k4.yaml",
        "data.name=synthetic",
        "data.root=null",
        "data.image_size=96",
        "data.channels=3",
        "data.train_size=8",
        "data.val_size=4",
        "data.test_size=4",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.num_workers=0",
        "train.max_steps=1",
        "train.epochs=1",
        "log.live=off",
        f"out_dir={tmp_path / 'run'}",
    ]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = json.loads((tmp_path / "run" / "summary.json").read_text())["modules"]
    assert [m["body_params"] for m in modules] == [65_872, 199_680, 499_968, 961_792]
    assert [m["head_params"] for m in modules] == [8_106, 12_170, 42_762, 42_762]
    assert [m["blocks"] for m in modules] == [[0, 14], [14, 28], [28, 41], [41, 54]]
    assert [m["tau"] for m in modules] == [0.5, 0.5, 1.0, 1.0]
