"""Local objectives: each loss against a hand computation on tiny tensors, the interface the stage
uses, DGL's heads, and every method in every regime."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trgl_pipe.config import Config, ObjectiveConfig, from_dict
from trgl_pipe.errors import ConfigError
from trgl_pipe.models.dgl_heads import DglHead
from trgl_pipe.objectives import LocalInputs, ModuleSpec, build_objective, needs_image
from trgl_pipe.objectives.infopro import (
    InfoProLObjective,
    InfoProObjective,
    module_weights,
    supervised_contrastive,
)
from trgl_pipe.objectives.predsim import PredSimObjective, pooling_for, similarity_matrix
from trgl_pipe.training.single import run_single
from trgl_pipe.watch.metrics import read_metrics

CPU = torch.device("cpu")


def _spec(index: int = 0, num_modules: int = 2, **kw) -> ModuleSpec:
    base = dict(in_shape=(1, 4, 4), out_shape=(2, 2, 2), image_shape=(1, 4, 4), num_classes=3)
    return ModuleSpec(index, num_modules, **{**base, **kw})


def _inputs(**kw) -> LocalInputs:
    base = dict(
        x=torch.zeros(2, 1, 4, 4),
        out=torch.zeros(2, 2, 2, 2),
        kinetic=torch.tensor(0.0),
        logits=torch.zeros(2, 3),
        ce=torch.tensor(0.7),
        y=torch.tensor([0, 1]),
    )
    return LocalInputs(**{**base, **kw})


def test_infopro_weights_move_linearly_from_the_first_module_to_module_k_minus_2() -> None:
    assert [module_weights([1.0, 0.0, 0.0, 1.0], k, 4) for k in range(3)] == [
        (1.0, 0.0),
        (0.5, 0.5),
        (0.0, 1.0),
    ]
    assert module_weights([5.0, 0.5, 0.0, 0.0], 0, 2) == (5.0, 0.5)  # K=2: one local module


def test_infopro_softmax_loss_by_hand() -> None:
    # λ = (5, 0.5) at K=2; the image is restored from (x - 0.5) / 0.25 to [0, 1]
    objective = InfoProObjective(_spec(mean=(0.5,), std=(0.25,)))
    pixels = torch.tensor([0.0, 0.25, 0.5, 1.0]).repeat(8).view(2, 1, 4, 4)
    image = (pixels - 0.5) / 0.25
    recon = torch.full((2, 1, 4, 4), 0.5)
    recon[0, 0, 0, 0] = 0.9
    loss = objective.loss(_inputs(image=image, extras={"reconstruction": recon}))
    bce = -(pixels * recon.log() + (1 - pixels) * (1 - recon).log()).mean()
    assert math.isclose(loss.item(), 5 * bce.item() + 0.5 * 0.7, rel_tol=1e-6)
    assert objective.needs_image and not objective.probe_head


def test_supervised_contrastive_loss_by_hand() -> None:
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.2]]), dim=1)
    y = torch.tensor([0, 0, 1, 1])
    t = 0.5
    total = 0.0
    for i in range(4):
        others = [j for j in range(4) if j != i]
        denominator = sum(math.exp(float(z[i] @ z[j]) / t) for j in others)
        positives = [j for j in others if y[j] == y[i]]
        total += -sum(float(z[i] @ z[p]) / t - math.log(denominator) for p in positives) / len(positives)
    expected = (t / 0.07) * total / 4
    assert math.isclose(supervised_contrastive(z, y, t).item(), expected, rel_tol=1e-5)


def test_infopro_contrast_trains_a_probe_and_adds_its_ce() -> None:
    objective = InfoProObjective(_spec(), loss="contrast", weights=[2.0, 3.0, 0.0, 0.0], temperature=0.5)
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6]]), dim=1)
    recon = torch.full((2, 1, 4, 4), 0.5)
    image = torch.full((2, 1, 4, 4), 0.5)  # no normalisation given: the image as it is
    loss = objective.loss(_inputs(image=image, extras={"reconstruction": recon, "embedding": z}))
    contrast = supervised_contrastive(z, torch.tensor([0, 1]), 0.5)  # no positives: 0
    assert contrast.item() == 0.0
    assert math.isclose(loss.item(), 2 * math.log(2) + 0.7, rel_tol=1e-6)
    assert objective.probe_head and objective.head() is None and "projection" in objective.networks()


def test_infopro_l_reconstructs_the_module_input_with_a_squared_error() -> None:
    objective = InfoProLObjective(_spec(), weights=[2.0, 1.0, 0.0, 0.0])
    x = torch.arange(32.0).view(2, 1, 4, 4)
    recon = x + 0.5
    loss = objective.loss(_inputs(x=x, extras={"reconstruction": recon}))
    assert math.isclose(loss.item(), 2 * 0.25 + 0.7, rel_tol=1e-6)
    assert not objective.needs_image  # it never needs the image: InfoProL sends nothing extra


def test_infopro_last_module_is_plain_cross_entropy_and_other_k_need_weights() -> None:
    last = InfoProObjective(_spec(1, 2))
    assert last.loss(_inputs()).item() == pytest.approx(0.7)
    assert not last.networks() and last.head() is None and not last.needs_image
    with pytest.raises(ConfigError, match=r"objective\.kwargs\.weights"):
        InfoProObjective(_spec(0, 3))


def test_similarity_matrix_by_hand() -> None:
    rows = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 1.0, 4.0]])
    centred = rows - rows.mean(1, keepdim=True)
    unit = centred / centred.norm(dim=1, keepdim=True)
    assert torch.allclose(similarity_matrix(rows), unit @ unit.T, atol=1e-6)
    # a feature map with more than 3 channels: each channel's standard deviation over positions
    maps = torch.randn(3, 4, 2, 2)
    assert torch.allclose(similarity_matrix(maps), similarity_matrix(maps.flatten(2).std(2)))


def test_predsim_loss_by_hand() -> None:
    objective = PredSimObjective(_spec(num_classes=2), beta=0.9)
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 0])
    # S(h): rows centred to ±0.5 and 0 -> [[1, -1, 0], [-1, 1, 0], [0, 0, 0]]; S(onehot) = ±1
    target = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])
    mse = ((similarity_matrix(h) - target) ** 2).mean()
    assert math.isclose(mse.item(), 5 / 9, rel_tol=1e-6)  # differences: 1, 1 and 3 entries of ±1
    loss = objective.loss(_inputs(y=y, extras={"similarity": h}))
    assert math.isclose(loss.item(), 0.1 * 0.7 + 0.9 * 5 / 9, rel_tol=1e-6)
    last = PredSimObjective(_spec(1, 2), beta=0.9)
    assert math.isclose(last.loss(_inputs()).item(), 0.1 * 0.7, rel_tol=1e-6)


def test_predsim_prediction_head_pools_to_the_authors_feature_limit() -> None:
    assert pooling_for(8, 28, 4096) == ((2, 1), (0, 0), 8 * 14 * 28)
    assert pooling_for(16, 8, 4096) == ((1, 1), (0, 0), 1024)
    head = PredSimObjective(_spec(out_shape=(8, 28, 28), num_classes=10)).head()
    assert head(torch.randn(2, 8, 28, 28)).shape == (2, 10)
    assert float(head.fc.weight.detach().abs().sum()) == 0.0  # the prediction layer starts at zero


def test_dgl_heads_have_the_authors_layers() -> None:
    c, n = 4, 10
    cnn, mlp = DglHead(c, n, (8, 8), "cnn"), DglHead(c, n, (8, 8), "mlp_sr")
    bn = 2 * c
    assert sum(p.numel() for p in cnn.parameters()) == 2 * (c * c * 9 + bn) + bn + (4 * c * n + n)
    hidden = 4 * c
    mlp_params = 3 * (c * c + bn) + 3 * (hidden * hidden + hidden + 2 * hidden) + hidden * n + n
    assert sum(p.numel() for p in mlp.parameters()) == mlp_params
    x = torch.randn(3, c, 8, 8)
    assert cnn(x).shape == mlp(x).shape == (3, n)


def test_objective_name_selects_and_checks_its_keys(tiny) -> None:
    cfg = tiny("model.num_modules=4", "objective.name=vangl")
    spec = _spec(0, 4)
    vangl = {"tau": None, "lambda": None, "method": "vangl", "label": "VanGL"}
    assert build_objective(cfg, spec).describe() == vangl
    assert build_objective(tiny(), spec).describe()["method"] == "trgl"
    contrast = tiny("objective.name=infopro", "objective.kwargs.loss=contrast", "model.num_modules=4")
    assert build_objective(contrast, spec).describe()["label"] == "InfoPro (contrast)"
    assert needs_image(tiny("objective.name=infopro"), 0, 2) and not needs_image(
        tiny("objective.name=infopro"), 1, 2
    )
    infopro, predsim = "objective.name=infopro", "objective.name=predsim"
    for bad, match in [
        (["objective.name=sedona"], "objective.name=sedona is not an objective here; choose one of trgl"),
        ([infopro, "objective.kwargs.weights=[1, 2]"], r"objective\.kwargs\.weights=\[1, 2\]: give 4"),
        ([infopro, "objective.kwargs.loss=mse"], "objective.kwargs.loss=mse is not InfoPro's"),
        ([predsim, "objective.kwargs.beta=1.5"], r"objective\.kwargs\.beta must be a number in \[0, 1\]"),
        ([predsim, "objective.kwargs.tau=1"], "PredSimObjective takes no tau; it takes beta, dim_in_decoder"),
        (["objective.kwargs.tau=1"], "TRGL's settings are the trgl section's keys"),
        (["objective.typo=1"], "unknown config key 'objective.typo'"),
        (["aux.type=mlp"], "aux.type must be one of"),
    ]:
        with pytest.raises(ConfigError, match=match):
            tiny(*bad)
    assert isinstance(tiny().objective, ObjectiveConfig) and isinstance(tiny(), Config)


METHODS = {
    "trgl": ["objective.name=trgl"],
    "vangl": ["objective.name=vangl"],
    "infopro-softmax": ["objective.name=infopro"],
    "infopro-contrast": ["objective.name=infopro", "objective.kwargs.loss=contrast"],
    # the authors' InfoPro weights (λ1 = 5 on a squared error of features) diverge here at lr 0.1
    "infopro_l": ["objective.name=infopro_l", "objective.kwargs.weights=[0.5, 1, 0, 0]"],
    "predsim": ["objective.name=predsim"],
    "auglocal": ["objective.name=auglocal"],
    "dgl-cnn": ["objective.name=vangl", "aux.type=dgl_cnn"],
    "dgl-mlp-sr": ["objective.name=vangl", "aux.type=dgl_mlp_sr"],
}
REGIMES = {
    "e2e": ["train.regime=e2e"],
    "parallel": ["train.regime=parallel"],
    "sequential": ["train.regime=sequential"],
    "multilap": ["train.regime=multilap", "train.laps=2"],
    "sim": ["pipeline.transport=sim"],
}


@pytest.mark.slow
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_in_every_regime(tiny, method: str, regime: str) -> None:
    cfg = tiny(*METHODS[method], *REGIMES[regime], "checkpoint.every_epochs=0", "data.train_size=128")
    summary = run_single(cfg, console_summary=False)
    events = [e for e in read_metrics(Path(cfg.out_dir) / "metrics.jsonl") if e["event"] == "train"]
    k = 1 if regime == "e2e" else 2
    assert sorted({e["module"] for e in events}) == list(range(k))
    assert all(math.isfinite(e["loss"]) and e["samples"] > 0 for e in events)
    assert all(m["num_steps"] == 4 for m in summary["modules"])  # 128 images, batches of 64, 2 epochs
    if regime != "e2e" and method.startswith("infopro"):
        assert summary["modules"][0]["aux_params"] > 0  # the decoder trained with module 0


def test_simulated_pipeline_carries_the_image_and_equals_the_parallel_regime(tiny) -> None:
    common = ("model.num_modules=4", "objective.name=infopro", "objective.kwargs.loss=contrast")
    a = tiny(*common)
    b = tiny(*common, "pipeline.transport=sim")
    run_single(a, console_summary=False)
    run_single(b, console_summary=False)

    def losses(cfg: Config) -> dict:
        return {
            (e["module"], e["step"]): e["loss"]
            for e in read_metrics(Path(cfg.out_dir) / "metrics.jsonl")
            if e["event"] == "train"
        }

    assert losses(a) == losses(b) and len(losses(a)) == 40


def test_the_competitors_study_is_defined_with_valid_configs() -> None:
    import importlib.util

    from trgl_pipe.config import load_config

    path = Path(__file__).resolve().parents[1] / "experiments" / "run.py"
    spec = importlib.util.spec_from_file_location("experiments_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runs = module.experiment("competitors")
    assert len(runs) == 8 and all(seeds == [0, 1, 2] for _, _, seeds in runs)  # 24 runs
    names = set()
    for _, overrides, _ in runs:
        cfg = load_config(None, overrides)  # every key valid
        assert cfg.data.train_size == 5000 and cfg.train.epochs == 30 and cfg.model.depth == 38
        names.add((cfg.objective.name, cfg.objective.kwargs.get("loss"), cfg.aux.type, cfg.model.num_modules))
    assert len(names) == 8


@pytest.mark.parametrize("method", ["infopro", "predsim"])
def test_a_module_with_the_objectives_own_head_exports_with_its_accuracy(tiny, method: str) -> None:
    from trgl_pipe.evaluate import evaluate
    from trgl_pipe.export import export

    cfg = tiny(f"objective.name={method}")
    summary = run_single(cfg, console_summary=False)
    out = Path(cfg.out_dir)
    export(out, module=0)  # module 0's F_k is the projection / prediction head
    assert (
        evaluate(out / "export", "test", program=False)["accuracy"] == summary["modules"][0]["test_accuracy"]
    )


def test_a_resumed_infopro_run_ends_like_an_uninterrupted_one(tiny) -> None:
    # the decoder, projection head and their optimizer state are part of the module's shard
    common = ("objective.name=infopro", "objective.kwargs.loss=contrast", "checkpoint.keep=100")
    full = tiny(*common, "checkpoint.every_steps=3")
    run_single(full, console_summary=False)
    resumed = tiny(*common, f"resume={Path(full.out_dir) / 'checkpoints' / '0000000003'}")
    run_single(resumed, console_summary=False)

    def final(out: str) -> dict:
        folder = sorted((Path(out) / "checkpoints").iterdir())[-1]
        return torch.load(folder / "module-0.pt", weights_only=True)["stage"]

    a, b = final(full.out_dir), final(resumed.out_dir)
    assert a["aux"].keys() == b["aux"].keys() and "decoder.net.0.weight" in a["aux"]
    for part in ("body", "head", "aux"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), (part, name)


def test_reports_and_summaries_name_the_objective() -> None:
    from trgl_pipe.report import describe

    summary = {"regime": "parallel", "num_modules": 4}

    def config(objective: dict, aux_type: str = "conv", enabled: bool = True) -> dict:
        trgl = {"enabled": enabled, "tau": 1e4, "tau_schedule": "constant"}
        return {
            "trgl": trgl,
            "objective": objective,
            "aux": {"type": aux_type},
            "model": {"split": "depth"},
            "data": {},
        }

    assert (
        describe(config({"name": "infopro", "infopro_loss": "contrast"}), summary)
        == "Par InfoPro (contrast) K=4"
    )
    assert describe(config({"name": "predsim"}), summary) == "Par PredSim K=4"
    assert describe(config({"name": "vangl"}, "dgl_mlp_sr"), summary) == "Par DGL (MLP-SR) K=4"
    assert describe(config({"name": "trgl"}, enabled=False), summary) == "Par VanGL K=4"
    assert describe(config({"name": "trgl"}), summary) == "Par TRGL τ=10000 K=4"
    old = config({})
    del old["objective"]
    assert describe(old, summary) == "Par TRGL τ=10000 K=4"  # runs from before objectives existed
    # a run written now: the objective's own label, from describe(), whatever its config says
    labelled = {**summary, "method_label": "Distill (w=0.5)"}
    assert describe(config({"name": "user_pkg.objectives:Distill"}), labelled) == "Par Distill (w=0.5) K=4"
    new_style = config({"name": "infopro", "kwargs": {"loss": "contrast"}})
    assert describe(new_style, summary) == "Par InfoPro (contrast) K=4"


def test_the_old_flat_keys_move_into_kwargs_with_one_warning_naming_the_new_key(tiny) -> None:
    with pytest.warns(
        FutureWarning, match=r"objective\.infopro_loss is deprecated: use objective\.kwargs\.loss"
    ):
        cfg = tiny("objective.name=infopro", "objective.infopro_loss=contrast")
    assert cfg.objective.kwargs == {"loss": "contrast"} and "infopro_loss" not in cfg.to_dict()["objective"]
    with pytest.warns(FutureWarning, match="objective.predsim_beta is deprecated: use objective.kwargs.beta"):
        assert tiny("objective.name=predsim", "objective.predsim_beta=0.5").objective.kwargs == {"beta": 0.5}
    with pytest.raises(
        ConfigError, match=r"objective\.infopro_loss=contrast and objective\.kwargs\.loss=softmax disagree"
    ):
        tiny("objective.name=infopro", "objective.infopro_loss=contrast", "objective.kwargs.loss=softmax")
    # a config.yaml written before: every old key at its old default, for any objective; no warning
    import warnings

    old = {"infopro_loss": "softmax", "infopro_weights": None, "infopro_widen": 1.0, "predsim_beta": 0.99}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("infopro", "predsim", "trgl"):
            assert from_dict(Config, {"objective": {"name": name, **old}}, "").objective.kwargs == {}


def test_objectives_run_on_swin_token_maps(tiny) -> None:
    from trgl_pipe.context import build_context

    swin = ["model.arch=swin_t", "model.patch_size=2", "model.window_size=2", "data.name=synthetic"]
    swin += ["data.channels=3", "data.image_size=32", "data.batch_size=8", "model.num_modules=4"]
    for extra in (["objective.name=infopro", "objective.kwargs.loss=contrast"], ["objective.name=predsim"]):
        ctx = build_context(tiny(*swin, *extra), CPU)
        stages = [ctx.build_stage(i) for i in range(4)]
        x, y = next(iter(ctx.batches.train_batches(0)))
        h = x
        for stage in stages:
            h = stage.train_step(h, y, x if stage.objective.needs_image else None)
        assert all(math.isfinite(float(s.last_loss)) for s in stages)
        assert stages[1].num_aux_params > 0  # the decoder / similarity conv on [N, H, W, C] tokens


def test_auglocal_samples_later_layers_evenly_and_shrinks_its_depth_like_a_pyramid() -> None:
    from trgl_pipe.objectives.auglocal import AugLocalObjective, SampledBlock, pyramid_depth, sampled_layers

    # ResNet-32 counted as the authors count it: 16 layers (the stem is layer 0)
    assert sampled_layers(1, 16, 3) == [6, 10, 15] and sampled_layers(13, 16, 3) == [14, 15]
    assert sampled_layers(0, 16, 1) == [15]
    # d = 5, c = 0.5 over 11 local modules (their ResNet-32 at d = 5): 5 at module 0 → 3 at module 9
    assert [pyramid_depth(5, k, 11, 0.5) for k in (0, 5, 9)] == [5, 4, 3] and pyramid_depth(5, 3, 11, 0) == 5
    # a module ending at a 16-channel 8x8 map, before three blocks: one at 8x8, two at 4x4 with 32
    later = ((16, 8, 8), (32, 4, 4), (32, 4, 4))
    spec = _spec(0, 3, out_shape=(16, 8, 8), num_classes=10, later_shapes=later, last_block=1)
    objective = AugLocalObjective(spec, depth=2, pyramid=0.0)
    head = objective.head()
    blocks = [m for m in head if isinstance(m, SampledBlock)]
    assert [b.branch[0].stride for b in blocks] == [(1, 1), (2, 2)]  # layers 2 and 4 sampled
    assert [b.branch[0].out_channels for b in blocks] == [16, 32]
    assert head(torch.randn(4, 16, 8, 8)).shape == (4, 10) and objective.loss(_inputs()) == _inputs().ce
    assert AugLocalObjective(_spec(2, 3, later_shapes=())).head() is None  # the last: the network's head
    with pytest.raises(ConfigError, match="token maps"):
        AugLocalObjective(_spec(0, 3, out_shape=(4, 4, 8), tokens=True, later_shapes=later))
