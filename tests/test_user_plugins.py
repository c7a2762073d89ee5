"""Your own network and data: import paths, trgl_pipe.Network / Residual, the Python API, bad input.

The user code lives in tests/user_pkg, written as a user would write it (it imports only the
public ``trgl_pipe`` names).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import trgl_pipe
from trgl_pipe.config import load_config
from trgl_pipe.errors import ConfigError, DataError
from trgl_pipe.models import AuxHead, TokenHead, VectorHead, build_backbone
from trgl_pipe.models.user import PlainBlock, ProtocolBlock
from trgl_pipe.run import main
from trgl_pipe.stage import ModuleBody, build_head
from trgl_pipe.training.single import run_single

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_cli, run_here

NETS = "tests.user_pkg.nets"
DATA = "tests.user_pkg.data"

# 240 training images of 1x14x14 (4 classes), 60 held out, 60 test: a run takes about a second
SMALL = [
    f"data.name={DATA}:arrays",
    "data.val_size=60",
    "data.batch_size=32",
    "data.eval_batch_size=60",
    "train.epochs=2",
    "model.num_modules=2",
    "train.num_threads=1",
    "optim.lr=0.05",
    "trgl.tau=1000",
    "log.live=off",
    "log.every_steps=1",
]

# the transformer and MobileNetV2 learn these few steps with Adam, not with SGD
OPTIM = {
    "mobilenet_v2": ["optim.name=adam", "optim.lr=0.005", "optim.weight_decay=0"],
    "vit": ["optim.name=adam", "optim.lr=0.005", "optim.weight_decay=0"],
}

REGIMES = {
    "e2e": ["train.regime=e2e"],
    "parallel": ["train.regime=parallel"],
    "sequential": ["train.regime=sequential"],
    "multilap": ["train.regime=multilap", "train.laps=2", "train.epochs=2"],
    "sim": ["train.regime=parallel", "pipeline.transport=sim", "pipeline.timeout_s=30"],
}


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [*SMALL, f"out_dir={tmp_path / 'run'}", *overrides])


def _train_events(out_dir: str) -> list[dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "train"]


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("net", ["mlp", "resnet", "mobilenet_v2", "vit"])
def test_every_user_network_trains_in_every_regime(tmp_path: Path, net: str, regime: str) -> None:
    optim = OPTIM.get(net, [])
    cfg = _cfg(tmp_path, f"model.arch={NETS}:{net}", "train.epochs=4", *optim, *REGIMES[regime])
    summary = run_single(cfg, console_summary=False)
    k = 1 if regime == "e2e" else 2
    assert [m["index"] for m in summary["modules"]] == list(range(k))
    events = _train_events(cfg.out_dir)
    assert {e["module"] for e in events} == set(range(k))
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in events)
    for module in range(k):  # each module's cross-entropy falls: first two steps vs last two
        ce = [e["ce"] for e in events if e["module"] == module]
        assert sum(ce[-2:]) < sum(ce[:2]) - 0.1, (module, ce)
    if net in ("resnet", "vit"):  # exact residuals: every module pays a transport cost
        assert all(e["kinetic"] > 0 for e in events)


def test_the_residual_resnet_has_the_kinetic_energy_of_the_built_in_one() -> None:
    ours = load_config(None, [f"model.arch={NETS}:resnet", "model.arch_kwargs={depth: 14, width: 4}"])
    builtin = load_config(
        None, ["model.depth=14", "model.width=4", "model.block=preact", "model.shortcut=pad"]
    )
    a = build_backbone(ours.model, (3, 16, 16), 10, 0)
    b = build_backbone(builtin.model, (3, 16, 16), 10, 0)
    assert a.num_blocks == b.num_blocks == 6 and a.shapes == b.shapes
    # the same weights, in the same order (stem, then each block's BN, conv, BN, conv)
    src = [*b.stem.state_dict().values()] + [v for blk in b.blocks for v in blk.state_dict().values()]
    dst = [*a.stem.state_dict().items()] + [kv for blk in a.blocks for kv in blk.state_dict().items()]
    assert len(src) == len(dst)
    with torch.no_grad():
        for (_, target), value in zip(dst, src, strict=True):
            target.copy_(value)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for reduction in ("sum", "mean"):
        body_a = ModuleBody(a.stem, a.blocks, 0, reduction).train()
        body_b = ModuleBody(b.stem, b.blocks, 0, reduction).train()
        out_a, energy_a = body_a(x, per_block=True)
        out_b, energy_b = body_b(x, per_block=True)
        assert torch.equal(out_a, out_b)
        assert torch.equal(energy_a, energy_b) and bool((energy_a > 0).all())
        # the fused energy (training) equals the one reported on detached residuals
        _, reported = body_a(x, kinetic_grad=False, per_block=True)
        assert torch.allclose(reported, energy_a, rtol=1e-6)


def test_plain_blocks_pay_their_displacement_where_shapes_agree(capsys, monkeypatch) -> None:
    import trgl_pipe.models.user

    monkeypatch.setattr(trgl_pipe.models.user, "_WARNED", set())  # as in a fresh process
    cfg = load_config(None, [f"model.arch={NETS}:mlp", "model.arch_kwargs={width: 8, depth: 3}"])
    parts = build_backbone(cfg.model, (1, 4, 4), 3, 0)
    assert all(isinstance(b, PlainBlock) for b in parts.blocks)
    assert [b.displacement for b in parts.blocks] == [False, True, True]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "blocks [0] change the shape" in err
    build_backbone(cfg.model, (1, 4, 4), 3, 0)
    assert "warning:" not in capsys.readouterr().err  # once per process
    x = torch.randn(5, 1, 4, 4)
    body = ModuleBody(None, parts.blocks, 0)
    _, energies = body(x, per_block=True)
    h0 = parts.blocks[0].block(x)
    h1 = parts.blocks[1].block(h0)
    assert energies[0] == 0
    assert torch.allclose(energies[1], (h1 - h0).pow(2).sum() / 5)


def test_heads_follow_the_shape_of_the_block_output() -> None:
    def head_of(net: str, last: str = "aux") -> nn.Module:
        cfg = load_config(None, [f"model.arch={NETS}:{net}", "model.num_modules=2", f"aux.last={last}"])
        parts = build_backbone(cfg.model, (1, 14, 14), 4, 0)
        from trgl_pipe.stage import StagePlan

        return build_head(parts, StagePlan(0, 2, 0, 1), 4, cfg)

    assert isinstance(head_of("mlp"), VectorHead)
    assert isinstance(head_of("vit"), TokenHead)
    assert isinstance(head_of("resnet"), AuxHead)
    # a network without a head of its own: the last module gets an auxiliary head too
    cfg = load_config(None, [f"model.arch={NETS}:vit", "model.num_modules=2"])
    parts = build_backbone(cfg.model, (1, 14, 14), 4, 0)
    from trgl_pipe.stage import StagePlan

    assert isinstance(build_head(parts, StagePlan(1, 2, 2, 4), 4, cfg), TokenHead)
    assert isinstance(parts.blocks[0], ProtocolBlock)


def test_a_user_head_builder_gets_the_shape(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        f"model.arch={NETS}:vit",
        f"aux.head={NETS}:linear_head",
        "model.num_modules=2",
        "train.max_steps=2",
    )
    summary = run_single(cfg, console_summary=False)
    assert len(summary["modules"]) == 2
    from tests.user_pkg.nets import SEEN_HEAD_SHAPES

    assert SEEN_HEAD_SHAPES[-2:] == [(4, 16), (4, 16)]


def test_train_in_one_process_with_callables_and_objects(tmp_path: Path) -> None:
    from tests.user_pkg.data import arrays
    from tests.user_pkg.nets import resnet

    config = {"data": {"val_size": 60, "batch_size": 32}, "model": {"num_modules": 3}}
    common = {"train": {"epochs": 1, "num_threads": 1}, "log": {"live": "off"}}
    a = trgl_pipe.train(config, model=resnet, data=arrays, out_dir=str(tmp_path / "a"), **common)
    assert a["num_modules"] == 3 and len(a["modules"]) == 3
    assert a["modules"][-1]["test_accuracy"] > 0.3
    # a built network and the data themselves; dotted keys too
    built = resnet((1, 14, 14), 4)
    b = trgl_pipe.train(
        config, model=built, data=arrays(), out_dir=str(tmp_path / "b"), **common, **{"model.num_modules": 2}
    )
    assert len(b["modules"]) == 2
    saved = (tmp_path / "b" / "config.yaml").read_text()
    assert "model_object_" in saved and "data_object_" in saved


def test_a_user_dataset_trains_through_the_cli(tmp_path: Path, capsys) -> None:
    # the Dataset of PIL images here; the arrays train in-process in every other test
    for source, extra in (("datasets", ["data.train_size=120", "data.class_balanced=true"]),):
        out = tmp_path / source
        result = run_here(
            [*SMALL, f"data.name={DATA}:{source}", f"model.arch={NETS}:mlp", f"out_dir={out}", *extra], capsys
        )
        assert result.returncode == 0, result.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["modules"][0]["test_accuracy"] > 0.5
        assert "1x14x14, 4 classes" in result.stdout
        if extra:
            assert "120 train / 60 val / 60 test" in result.stdout


def test_a_user_dataset_of_float_tensors_is_standardised_as_it_is(tmp_path: Path) -> None:
    from trgl_pipe.data import load_data

    cfg = load_config(None, [f"data.name={DATA}:floats", "data.val_size=10"])
    data = load_data(cfg.data, 0)
    assert data.train.images.dtype == torch.float32 and data.num_classes == 3
    assert data.mean.tolist() == pytest.approx([data.train.images.mean().item()], rel=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.arch=no_such_pkg.nets:build"], "cannot import module no_such_pkg.nets (ModuleNotFoundError"),
        ([f"model.arch={NETS}:missing"], f"module {NETS} has no attribute missing"),
        ([f"model.arch={NETS}:returns_a_list"], "returned a list of Linear; expected an nn.Sequential"),
        ([f"model.arch={NETS}:five_d"], "block 0 gives outputs of shape [N, 1, 1, 14, 14], which no"),
        ([f"model.arch={NETS}:mlp", "model.arch_kwargs={colour: red}"], "cannot call it with"),
        ([f"model.arch={NETS}:resnet", "model.num_modules=5"], "larger than the 3 blocks of model.arch"),
        ([f"data.name={DATA}:wrong_items"], "item 0 is str; expected (image tensor"),
        ([f"data.name={DATA}:not_a_pair"], "returned a dict; expected (train, test)"),
        (["model.arch=resnet19"], "or an import path like my_pkg.nets:build, got 'resnet19'"),
    ],
    ids=[
        "import",
        "attribute",
        "return-type",
        "no-head",
        "kwargs",
        "too-many-modules",
        "items",
        "pair",
        "name",
    ],
)
def test_bad_user_input_gets_one_line(tmp_path: Path, capsys, overrides: list[str], message: str) -> None:
    code = main([*SMALL, f"out_dir={tmp_path / 'run'}", "train.max_steps=1", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]


def test_a_module_that_does_not_import_gets_one_line_from_the_cli(tmp_path: Path, capsys) -> None:
    result = run_here([*SMALL, f"out_dir={tmp_path / 'run'}", f"model.arch={NETS}_missing:build"], capsys)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: model.arch={NETS}_missing:build: cannot import module {NETS}_missing "
        f"(ModuleNotFoundError: No module named '{NETS}_missing'); is it installed or on PYTHONPATH "
        "on every rank?"
    ]


def test_a_builder_that_raises_shows_its_own_frames_then_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli([*SMALL, f"out_dir={out}", f"model.arch={NETS}:raises"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"Traceback of {NETS}:raises (most recent call last):"
    assert lines[-1] == f"error: model.arch={NETS}:raises raised ValueError: width 4 is not a multiple of 3"
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    frames = "\n".join(lines[1:-1])
    assert "in raises" in frames and "in _checked_width" in frames  # the user's frames
    assert lines[-2] == "ValueError: width 4 is not a multiple of 3"
    assert "plugins.py" not in frames and "models/user.py" not in frames  # and none of trgl_pipe's
    assert not out.exists()  # refused before anything was written


def test_ranks_that_build_different_networks_are_refused() -> None:
    from trgl_pipe.context import context_from_shape_info

    a = load_config(None, [f"model.arch={NETS}:mlp"])
    b = load_config(None, [f"model.arch={NETS}:mlp", "model.arch_kwargs={width: 16}"])
    info = {
        "partition": [[0, 1], [1, 2], [2, 3], [3, 3]],
        "num_classes": 4,
        "input_shape": [1, 14, 14],
        "steps_per_epoch": 1,
        "normalization": None,
        "split_sizes": {},
    }
    ctx_a = context_from_shape_info(a, torch.device("cpu"), info)
    ctx_b = context_from_shape_info(b, torch.device("cpu"), info)
    shared = {**info, "fingerprint": ctx_a.parts.fingerprint()}
    ctx_a.check_same_network(shared, 1)  # the same network: nothing to say
    with pytest.raises(ConfigError, match="rank 3 built another network than rank 0"):
        ctx_b.check_same_network(shared, 3)


def test_a_dataset_of_wrong_labels_is_refused() -> None:
    from trgl_pipe.data.user import image_set

    with pytest.raises(DataError, match="has a label of type float"):
        image_set([(torch.zeros(1, 2, 2), 0.5)], "data.name=x:y: the training set")
    # empty arrays: one line, not torch's "min(): Expected reduction dim" from the label check
    with pytest.raises(DataError, match=r"data.name=x:y: the training set is empty \(0 images\)"):
        image_set(
            (torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.long)), "data.name=x:y: the training set"
        )


def test_a_user_run_resumed_mid_epoch_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    # the ViT (protocol blocks, token heads) on the Dataset of PIL images, 6 steps an epoch
    common = [
        f"model.arch={NETS}:vit",
        f"data.name={DATA}:datasets",
        *OPTIM["vit"],
        "checkpoint.every_steps=4",
        "checkpoint.keep=100",
    ]
    full = load_config(None, [*SMALL, *common, f"out_dir={tmp_path / 'full'}"])
    summary_full = run_single(full, console_summary=False)
    source = tmp_path / "full" / "checkpoints" / "0000000004"
    assert (source / "meta.json").is_file()
    resumed = load_config(None, [*SMALL, *common, f"out_dir={tmp_path / 'resumed'}", f"resume={source}"])
    summary_resumed = run_single(resumed, console_summary=False)

    def steps(out_dir: str) -> list[tuple]:
        return [(e["module"], e["step"], e["loss"], e["kinetic"]) for e in _train_events(out_dir)]

    assert steps(full.out_dir)[-8:] == steps(resumed.out_dir)[-8:]  # bitwise, after the resume
    assert [m["history"] for m in summary_full["modules"]] == [
        m["history"] for m in summary_resumed["modules"]
    ]


def test_the_planner_measures_a_user_network_on_a_user_dataset() -> None:
    from trgl_pipe.plan import data_shape, profile_modules

    cfg = load_config(None, [*SMALL, f"model.arch={NETS}:resnet", "model.arch_kwargs={depth: 14}"])
    assert data_shape(cfg) == ((1, 14, 14), 4)
    profiles = profile_modules(cfg, [8], torch.device("cpu"), repeats=1)
    assert len(profiles) == 2 and all(p.param_bytes > 0 for p in profiles)


def test_the_public_names_resolve_and_say_what_they_are_for() -> None:
    for name in trgl_pipe.__all__:
        obj = getattr(trgl_pipe, name)
        assert obj.__doc__ and len(obj.__doc__) > 30, name
    with pytest.raises(AttributeError):
        trgl_pipe.no_such_name  # noqa: B018


@pytest.mark.parametrize("source", ["arrays", "floats"])
def test_an_exported_user_network_has_the_reported_accuracy(tmp_path: Path, source: str) -> None:
    from trgl_pipe.evaluate import evaluate
    from trgl_pipe.export import export

    overrides = [f"model.arch={NETS}:resnet", f"data.name={DATA}:{source}", "train.epochs=1"]
    if source == "floats":  # 6x6 float images in [-1, 3], not bytes
        overrides += ["data.val_size=10", "model.arch_kwargs={depth: 8, width: 4}"]
    cfg = _cfg(tmp_path, *overrides)
    summary = run_single(cfg, console_summary=False)
    info = export(Path(cfg.out_dir))
    assert info["module"] == summary["best_module"]
    assert evaluate(Path(cfg.out_dir) / "export", "test")["accuracy"] == summary["best_test_accuracy"]


def test_a_block_whose_output_shape_changes_is_refused_before_anything_is_written(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    result = run_here([*SMALL, f"out_dir={out}", f"model.arch={NETS}:wobbly"], capsys)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"error: model.arch={NETS}:wobbly: block 1 (_Wobbly) returned a tensor of shape [1, 197], then "
        "a tensor of shape [3, 198] on its next call (another batch of the same input shape): a block's "
        "output shape must depend on its input's only"
    ], result.stderr[-2000:]
    assert not out.exists()


def test_a_block_that_changes_its_shape_later_is_named_in_one_line() -> None:
    # a change the two calls at build time did not show (after more calls, or in training mode)
    import torch

    from trgl_pipe.errors import ConfigError
    from trgl_pipe.models.user import PlainBlock

    block = PlainBlock(torch.nn.Identity(), displacement=True)
    block.shape, block.where = (4,), "model.arch=pkg:net: block 2 (Identity)"
    assert block(torch.zeros(2, 4))[0].shape == (2, 4)
    with pytest.raises(ConfigError) as caught:
        block(torch.zeros(2, 5))
    assert str(caught.value) == (
        "model.arch=pkg:net: block 2 (Identity) returned samples of shape [5], but [4] when the network "
        "was built: a block's output shape must depend on its input's only"
    )
