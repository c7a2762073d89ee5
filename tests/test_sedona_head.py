"""SEDONA's auxiliary decoder as ``aux.type=sedona`` (trgl_pipe/models/sedona_heads.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trgl_pipe.config import ConfigError, load_config
from trgl_pipe.models.sedona_heads import InvertedResidual, SedonaHead, sedona_expand
from trgl_pipe.watch.metrics import read_metrics


@pytest.mark.parametrize(
    ("channels", "side", "depth", "expand", "blocks"),
    [
        # SEDONA's rule worked by hand: C/e planes after the separable conv (which halves the
        # map); stride 2 at blocks i = 1, 3 while the map is >= 2 wide, each adding C/(2e)
        # channels (C/e when e = 1)
        (64, 16, 1, 4, []),
        (64, 16, 4, 4, [(16, 16, 1), (16, 24, 2), (24, 24, 1)]),
        (64, 4, 4, 4, [(16, 16, 1), (16, 24, 2), (24, 24, 1)]),  # 4 -> 2 -> 1
        (64, 2, 4, 4, [(16, 16, 1), (16, 16, 1), (16, 16, 1)]),  # the map is 1 wide: no stride
        (16, 8, 4, 1, [(16, 16, 1), (16, 32, 2), (32, 32, 1)]),  # basic blocks: e = 1
    ],
)
def test_the_decoder_follows_sedonas_widths_and_strides(
    channels: int, side: int, depth: int, expand: int, blocks: list
) -> None:
    head = SedonaHead(channels, 10, (side, side), depth, expand, final_dim=32)
    assert head.blocks() == blocks
    residual = [m.residual for m in head.features if isinstance(m, InvertedResidual)]
    assert residual == [stride == 1 and a == b for a, b, stride in blocks]
    assert head(torch.randn(3, channels, side, side)).shape == (3, 10)


def test_sedonas_expansion_rule() -> None:
    assert [sedona_expand(a) for a in ("cifar_resnet", "resnet18", "resnet34", "resnet50", "vgg11_bn")] == [
        1,
        1,
        1,
        4,
        4,
    ]


def test_sedonas_smoothed_labels_are_torchs_label_smoothing_scaled_by_c_over_c_minus_1() -> None:
    # SEDONA: 1 - eps on the target, eps / (C - 1) elsewhere; torch spreads its value over all C
    classes, eps = 10, 0.1
    logits, y = torch.randn(64, classes, dtype=torch.float64), torch.randint(0, classes, (64,))
    target = torch.full((64, classes), eps / (classes - 1), dtype=torch.float64)
    target.scatter_(1, y[:, None], 1 - eps)
    theirs = -(target * F.log_softmax(logits, -1)).sum(-1).mean()
    ours = F.cross_entropy(logits, y, label_smoothing=eps * classes / (classes - 1))
    assert torch.allclose(theirs, ours, rtol=1e-12, atol=0)
    assert not torch.allclose(theirs, F.cross_entropy(logits, y, label_smoothing=eps), rtol=1e-6, atol=0)


def test_a_run_with_sedona_heads_trains_and_each_module_gets_its_depth(tiny) -> None:
    from trgl_pipe.stage import build_parts, make_aux_head
    from trgl_pipe.training.single import run_single

    cfg = tiny("aux.type=sedona", "aux.depth=[2,3]", "aux.channels=32", "aux.last=aux", "train.epochs=3")
    run_single(cfg, console_summary=False)
    for module in (0, 1):  # each module's CE falls from its first steps to its last (5 steps an epoch)
        events = read_metrics(Path(cfg.out_dir) / "metrics.jsonl")
        ce = [e["ce"] for e in events if e["event"] == "train" and e["module"] == module]
        assert len(ce) == 15 and sum(ce[-5:]) < sum(ce[:5]), (module, ce)
    backbone = build_parts(cfg, (1, 28, 28), 10)
    heads = [make_aux_head(backbone, 2, k, 2, 10, cfg) for k in range(2)]
    assert all(isinstance(h, SedonaHead) for h in heads)
    assert [len(h.blocks()) for h in heads] == [1, 2]  # depth - 1 inverted residual blocks each
    assert heads[0].classifier.in_features == 32  # aux.channels: the last 1x1 conv's width


def test_a_depth_list_of_the_wrong_length_is_one_line(tiny) -> None:
    from trgl_pipe.stage import build_parts, make_aux_head

    cfg = tiny("aux.type=sedona", "aux.depth=[1,2,3]")
    with pytest.raises(ConfigError, match=r"aux\.depth lists 3 values for 2 modules"):
        make_aux_head(build_parts(cfg, (1, 28, 28), 10), 2, 0, 2, 10, cfg)
    with pytest.raises(ConfigError, match=r"aux\.expand"):
        load_config(None, ["aux.type=sedona", "aux.expand=0"])


def test_depth_and_expand_without_sedonas_head_warn_that_they_are_unused() -> None:
    from trgl_pipe.errors import UnusedKeyWarning

    with pytest.warns(UnusedKeyWarning, match=r"aux\.depth \(aux\.type=dgl_cnn; depth and expand"):
        load_config(None, ["aux.type=dgl_cnn", "aux.depth=3"])
