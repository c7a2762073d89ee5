"""HPFF: the patch-wise cascade loss, and the gradient module k+1 sends module k one step late
(one process and the in-process pipeline; torchrun in multiproc/)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_final_states, final_stage_states, train_losses

from trgl_pipe.errors import ConfigError
from trgl_pipe.objectives import LocalInputs, ModuleSpec
from trgl_pipe.objectives.hpff import HpffObjective, quadrants
from trgl_pipe.training.single import run_single

HPFF = ["objective.name=hpff", "model.num_modules=3"]


def test_the_cascade_decodes_each_quadrant_against_the_images_and_only_it_goes_back() -> None:
    torch.manual_seed(0)
    spec = ModuleSpec(1, 4, (4, 8, 8), (4, 8, 8), (1, 8, 8), 3, mean=(0.5,), std=(0.25,))
    objective = HpffObjective(spec, weights=[2.0, 0.5, 0.0, 0.0])
    assert (objective.recon_weight, objective.task_weight) == (1.0, 0.25)  # halfway to module K-2
    nets, head = objective.networks(), objective.head()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = x * 2
    image = torch.randn(2, 1, 8, 8)
    extras = objective.forward(nets, x, out, image)
    assert [extras[f"patch{i}"].shape for i in range(4)] == [(2, 1, 4, 4)] * 4
    logits = head(out)
    y = torch.tensor([0, 2])
    ce = F.cross_entropy(logits, y)
    inputs = LocalInputs(x, out, torch.tensor(0.0), logits, ce, y, image, extras)
    target = (image * 0.25 + 0.5).clamp(0, 1)
    recon = sum(F.binary_cross_entropy(extras[f"patch{i}"], q) for i, q in enumerate(quadrants(target)))
    cascade = 0.999 * (1.0 * recon + 0.25 * F.cross_entropy(extras["cascade_logits"], y))
    assert torch.equal(objective.loss_for_previous(inputs), cascade)
    assert torch.equal(objective.loss(inputs), 0.001 * ce + cascade)
    top_right = quadrants(torch.arange(16.0).view(1, 1, 4, 4))[1]
    assert torch.equal(top_right, torch.tensor([[[[2.0, 3], [6, 7]]]]))
    first = HpffObjective(ModuleSpec(0, 4, (4, 8, 8), (4, 8, 8), (1, 8, 8), 3))
    assert first.loss_for_previous(inputs) is None  # module 0 has no module before it


def test_the_replay_adds_the_gradient_backpropagated_through_the_body(tiny) -> None:
    from trgl_pipe.context import build_context

    ctx = build_context(tiny(*HPFF), torch.device("cpu"))
    stage = ctx.build_stage(1)
    x = torch.randn(3, *ctx.parts.input_of(ctx.partition[1][0]))
    stage.body.train()
    out, _ = stage.body(x, kinetic_grad=False)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, list(stage.body.parameters()), grad)
    stage.optimizer.zero_grad(set_to_none=True)
    stage.replay_gradient(x, grad)
    for p, e in zip(stage.body.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)


def test_a_module_with_no_loss_of_its_own_trains_through_the_next_modules_gradient(tiny) -> None:
    # module 0's own loss is 0 (local and cascade weights 0 at module 0): it trains only through
    # the gradient module 1 sends; without it (cascade_weight 0) its body does not move
    common = (*HPFF[:1], "model.num_modules=2", "optim.weight_decay=0")
    sent = tiny(*common, "objective.kwargs={weights: [0, 0, 0, 0], local_weight: 0}")
    none = tiny(*common, "objective.kwargs={weights: [0, 0, 0, 0], local_weight: 0, cascade_weight: 0}")
    run_single(sent, console_summary=False)
    run_single(none, console_summary=False)
    from trgl_pipe.context import build_context

    start = build_context(sent, torch.device("cpu")).build_stage(0).body.state_dict()
    moved, still = final_stage_states(sent.out_dir)[0]["body"], final_stage_states(none.out_dir)[0]["body"]
    weights = [n for n in start if n.endswith("weight") and start[n].dim() > 1]
    assert all(torch.equal(still[n], start[n]) for n in weights)
    assert all(not torch.equal(moved[n], start[n]) for n in weights)


def test_the_in_process_pipeline_equals_the_parallel_regime(tiny) -> None:
    a, b = tiny(*HPFF), tiny(*HPFF, "pipeline.transport=sim")
    run_single(a, console_summary=False)
    run_single(b, console_summary=False)
    assert train_losses(a.out_dir) == train_losses(b.out_dir) and len(train_losses(a.out_dir)) == 30


def test_a_resumed_run_ends_like_an_uninterrupted_one(tiny) -> None:
    common = (*HPFF, "checkpoint.every_steps=3")
    full = tiny(*common, "checkpoint.keep=100")
    run_single(full, console_summary=False)
    resumed = tiny(*common, f"resume={Path(full.out_dir) / 'checkpoints' / '0000000003'}")
    run_single(resumed, console_summary=False)
    assert_same_final_states(full.out_dir, resumed.out_dir)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (["train.regime=sequential"], "objective.name=hpff does not train in train.regime=sequential"),
        (["pipeline.wire_dtype=bf16"], "pipeline.wire_dtype=bf16 is not supported with it"),
        (["pipeline.replicas=2"], "outside the replicas' gradient average; set pipeline.replicas=1"),
        (["objective.kwargs={weights: [1, 2]}"], r"objective.kwargs.weights=\[1, 2\]: give 4 numbers"),
        (["objective.kwargs={local_weight: -1}"], "objective.kwargs.local_weight must be a number, 0 or"),
    ],
)
def test_bad_settings_are_refused_in_one_line(tiny, bad: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run_single(tiny(*HPFF, *bad), console_summary=False)
