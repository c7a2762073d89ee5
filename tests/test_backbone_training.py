"""Every backbone trains: every regime in one process, and through torchrun with K=4."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_imagenet, run_here, run_torchrun, train_here

from trgl_pipe.config import load_config
from trgl_pipe.training.single import run_single
from trgl_pipe.watch.metrics import read_metrics

# small images, small batches; VGG's own torchvision classifier has 120M weights for a 7x7 map,
# so its last module takes an auxiliary head here
BACKBONES = {
    "resnet18": ["model.arch=resnet18"],
    "resnet50": ["model.arch=resnet50"],
    "vgg11_bn": ["model.arch=vgg11_bn", "aux.last=aux"],
    "swin_t": ["model.arch=swin_t", "model.patch_size=2", "model.window_size=2"],
}
SMALL = [
    "data.name=synthetic",
    "data.image_size=32",
    "data.channels=3",
    "data.train_size=48",
    "data.val_size=16",
    "data.test_size=16",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "model.num_modules=4",
    "train.epochs=1",
    "train.max_steps=3",
    "train.num_threads=1",
    "trgl.reduction=mean",
    "trgl.tau=1",
    "log.live=off",
    "log.every_steps=1",
    "checkpoint.every_epochs=0",
]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("regime", ["e2e", "parallel", "sequential", "multilap"])
@pytest.mark.parametrize("arch", list(BACKBONES))
def test_every_backbone_trains_in_every_regime(tiny, arch: str, regime: str) -> None:
    extra = ["train.laps=1"] if regime != "multilap" else ["train.epochs=2", "train.laps=2"]
    cfg = tiny(*SMALL, *BACKBONES[arch], f"train.regime={regime}", *extra)
    summary = run_single(cfg, console_summary=False)
    steps = [m["num_steps"] for m in summary["modules"]]
    assert steps == ([3] if regime == "e2e" else [3] * 4), steps
    losses = [e["loss"] for e in read_metrics(Path(cfg.out_dir) / "metrics.jsonl") if e["event"] == "train"]
    assert losses and all(v == v for v in losses)  # finite, no NaN


@pytest.mark.parametrize(
    "arch",
    ["resnet34", "resnet101", "resnet152", "vgg13_bn", "vgg16_bn", "vgg19_bn", "vgg19", "swin_s", "swin_b"],
)
def test_the_other_variants_build_and_run_a_training_step_of_every_module(tiny, arch: str) -> None:
    # on the meta device: the variants share their family's code (tested above by training), so
    # what is left to check is that each builds, splits into four modules and runs forward, local
    # loss and backward with consistent shapes; initialising and training 60-140 M weights on a
    # CPU would only repeat the family's test, at 5 s per variant
    from trgl_pipe.partition import split_by_depth
    from trgl_pipe.stage import audit_cuda_determinism, build_parts

    family = "swin_t" if arch.startswith("swin") else "vgg11_bn" if arch.startswith("vgg") else "resnet18"
    overrides = [o for o in BACKBONES[family] if not o.startswith("model.arch")]
    cfg = tiny(*SMALL, f"model.arch={arch}", *overrides)
    with torch.device("meta"):
        parts = build_parts(cfg, (3, 32, 32), 10)
    assert all(p.is_meta for p in parts.blocks[0].parameters())  # nothing was initialised
    partition = split_by_depth(parts.num_blocks, 4)
    for k in range(4):  # the step of each module (it raises on a shape that does not fit)
        audit_cuda_determinism(cfg, parts, partition, k, 10)


@pytest.mark.multiproc
@pytest.mark.parametrize("arch", ["resnet18", "swin_t"])
def test_backbones_run_as_a_pipeline(tmp_path: Path, arch: str) -> None:
    # Four modules as two ranks of two modules each: one boundary crosses ranks, one stays inside
    # a rank (tests/multiproc covers four ranks; the transport does not look at the network), each
    # compared with one process bit for bit. ResNet-50 and VGG train in the parallel regime in one
    # process above: their pipeline would only repeat the transport's test with other shapes.
    ranks = 2
    args = [*SMALL, *BACKBONES[arch], "pipeline.modules_per_rank=2", f"out_dir={tmp_path / 'pipe'}"]
    piped = run_torchrun(ranks, args, timeout=400)
    assert piped.returncode == 0, piped.stderr[-3000:]
    summary = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    assert summary["world_size"] == ranks and [m["num_steps"] for m in summary["modules"]] == [3] * 4
    # the pipeline equals the single-process run bit for bit; Swin's stochastic depth (0.2) too,
    # as every module draws its masks from its own stream
    # (the reference in this process: a start of torch fewer)
    run_single(
        load_config(
            None, [*SMALL, *BACKBONES[arch], f"out_dir={tmp_path / 'single'}", "checkpoint.every_epochs=1"]
        ),
        console_summary=False,
    )

    def steps(out: Path) -> dict:
        events = read_metrics(out / "metrics.jsonl")
        return {
            (e["module"], e["step"]): (e["loss"], e["ce"], e["kinetic"])
            for e in events
            if e["event"] == "train"
        }

    assert steps(tmp_path / "single") == steps(tmp_path / "pipe")
    s1 = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert [m["test_accuracy"] for m in s1["modules"]] == [m["test_accuracy"] for m in summary["modules"]]
    assert torch.equal(
        torch.tensor([m["kinetic_energy"] for m in s1["modules"]]),
        torch.tensor([m["kinetic_energy"] for m in summary["modules"]]),
    )


@pytest.mark.multiproc
def test_a_tiny_imagenet_folder_trains_in_one_process_and_through_torchrun(tmp_path: Path, capsys) -> None:
    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200", per_class=6, val=2)
    args = [
        "data.name=tiny_imagenet",
        f"data.root={root}",
        "data.val_size=3",
        "data.batch_size=5",
        "data.eval_batch_size=8",
        "data.augment=true",
        "model.arch=resnet18",
        "model.small_input=true",
        "model.num_modules=2",
        "train.epochs=1",
        "train.num_threads=1",
        "log.live=off",
        "checkpoint.every_epochs=0",
    ]
    train_here([*args, f"out_dir={tmp_path / 'single'}"])
    piped = run_torchrun(2, [*args, f"out_dir={tmp_path / 'pipe'}"])
    assert piped.returncode == 0, piped.stderr[-3000:]
    for out in ("single", "pipe"):
        summary = json.loads((tmp_path / out / "summary.json").read_text())
        assert summary["dataset"]["name"] == "tiny_imagenet"
        assert (summary["dataset"]["train"], summary["dataset"]["val"], summary["dataset"]["test"]) == (
            15,
            3,
            6,
        )
        assert [m["num_steps"] for m in summary["modules"]] == [3, 3]
    broken = run_here([*args, f"data.root={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'broken'}"], capsys)
    assert broken.returncode == 2 and broken.stderr.startswith("error: data.root=")
