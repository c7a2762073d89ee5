"""MAN: the momentum auxiliary network's loss, its average of the next block, and the weights
module k+1 sends back (one process and the in-process pipeline; torchrun in multiproc/)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_final_states, final_stage_states, train_losses

from trgl_pipe.errors import ConfigError
from trgl_pipe.models.blocks import PreActBlock
from trgl_pipe.objectives import LocalInputs, ModuleSpec
from trgl_pipe.objectives.man import ManObjective
from trgl_pipe.training.single import run_single

MAN = ["objective.name=man", "model.num_modules=3"]


def _spec(index: int = 0, num_modules: int = 3) -> ModuleSpec:
    block = PreActBlock(4, 8, stride=2)
    return ModuleSpec(
        index,
        num_modules,
        in_shape=(4, 8, 8),
        out_shape=(4, 8, 8),
        image_shape=(1, 8, 8),
        num_classes=3,
        mean=(0.5,),
        std=(0.25,),
        later_shapes=((8, 4, 4),),
        next_block=block,
    )


def test_the_loss_reads_the_sum_of_both_blocks_and_the_average_gets_no_gradient() -> None:
    torch.manual_seed(0)
    objective = ManObjective(_spec(), weights=[2.0, 0.5])
    nets, head = objective.networks(), objective.head()
    assert nets["learnable"].block is not objective.spec.next_block  # copies, never the block itself
    h = torch.randn(2, 4, 8, 8, requires_grad=True)
    image = torch.randn(2, 1, 8, 8)
    extras = objective.forward(nets, h, h, image)
    y = nets["learnable"](h) + nets["ema"](h)
    assert torch.equal(extras["head_input"], y) and y.shape == (2, 8, 4, 4)
    logits = head(extras["head_input"])
    labels = torch.tensor([0, 2])
    ce = F.cross_entropy(logits, labels)
    loss = objective.loss(LocalInputs(h, h, torch.tensor(0.0), logits, ce, labels, image, extras))
    target = (image * 0.25 + 0.5).clamp(0, 1)
    expected = 2.0 * F.binary_cross_entropy(extras["reconstruction"], target) + 0.5 * ce
    assert torch.equal(loss, expected)
    loss.backward()
    assert all(p.grad is None for p in nets["ema"].parameters())  # the average is not trained ...
    ema_only = torch.autograd.grad(nets["ema"](h).sum(), h)[0]
    assert ema_only.abs().sum() > 0  # ... but the gradient flows through it into the module
    assert all(p.grad is not None for p in nets["learnable"].parameters())
    assert head.net[3].weight.shape == (8, 8, 3, 3)  # 2c2f: a second conv (a 4x4 map keeps its width)


def test_n_steps_of_the_average_at_once_equal_n_steps_one_by_one() -> None:
    torch.manual_seed(1)
    objective = ManObjective(_spec(), momentum=0.9, every=3)
    nets = objective.networks()
    start = [p.detach().clone() for p in nets["ema"].parameters()]
    target = [torch.randn_like(p) for p in start]
    objective.take_next_weights(nets, target, 3)
    for p, p0, w in zip(nets["ema"].parameters(), start, target, strict=True):
        by_steps = p0.clone()
        for _ in range(3):
            by_steps = by_steps * 0.9 + w * (1 - 0.9)  # the official code's update, once per step
        torch.testing.assert_close(p, by_steps, rtol=1e-6, atol=1e-6)
    one = ManObjective(_spec(), momentum=0.9, every=1)
    nets = one.networks()
    p0 = [p.detach().clone() for p in nets["ema"].parameters()]
    one.take_next_weights(nets, target, 1)
    for p, a, w in zip(nets["ema"].parameters(), p0, target, strict=True):
        assert torch.equal(p, a * 0.9 + w * (1 - 0.9))  # N = 1: exactly the official update


def test_module_k_follows_module_k_plus_1s_block_with_n_steps_of_lag(tiny) -> None:
    # module 0's average after the run equals the average computed here from module 1's block as
    # the run's checkpoints recorded it every 2 steps (N = 2, 10 steps), 2 updates late
    every = "objective.kwargs={every: 2, momentum: 0.8}"
    cfg = tiny(*MAN, every, "checkpoint.every_steps=2", "checkpoint.keep=100")
    run_single(cfg, console_summary=False)
    folder = Path(cfg.out_dir) / "checkpoints"
    shard = lambda step, k: torch.load(folder / f"{step:010d}" / f"module-{k}.pt", weights_only=True)  # noqa: E731
    first = shard(4, 0)["stage"]["aux"]
    names = [n for n in first if n.startswith("ema.") and "running" not in n and "num_batches" not in n]
    block = lambda step: shard(step, 1)["stage"]["body"]  # noqa: E731
    # after 4 updates the average has taken B_0 (at step 2); B_{t-2} comes at steps t = 4, 6, 8
    ema = {n: first[n].clone() for n in names}
    for t in (4, 6, 8):
        b = block(t - 2)
        for n in names:
            live = b["blocks.0." + n.removeprefix("ema.block.")]
            ema[n] = ema[n] * 0.8**2 + live * (1 - 0.8**2)
    final = final_stage_states(cfg.out_dir)[0]["aux"]
    for n in names:
        torch.testing.assert_close(final[n], ema[n], rtol=0, atol=1e-6)


def test_a_resumed_run_ends_like_an_uninterrupted_one(tiny) -> None:
    # checkpoint after step 4 with N = 2: module 1 holds its block after updates 2 and 4, which
    # module 0 takes at steps 4 and 6; the resumed run must send both again
    common = (*MAN, "objective.kwargs={every: 2}", "checkpoint.every_steps=4")
    full = tiny(*common, "checkpoint.keep=100")
    run_single(full, console_summary=False)
    resumed = tiny(*common, f"resume={Path(full.out_dir) / 'checkpoints' / '0000000004'}")
    run_single(resumed, console_summary=False)
    assert_same_final_states(full.out_dir, resumed.out_dir)
    later = {key: v for key, v in train_losses(full.out_dir).items() if key[1] > 4}
    assert later == {key: v for key, v in train_losses(resumed.out_dir).items() if key[1] > 4}


def test_the_in_process_pipeline_equals_the_parallel_regime(tiny) -> None:
    a = tiny(*MAN, "objective.kwargs={every: 1}")
    b = tiny(*MAN, "objective.kwargs={every: 1}", "pipeline.transport=sim")
    run_single(a, console_summary=False)
    run_single(b, console_summary=False)
    assert train_losses(a.out_dir) == train_losses(b.out_dir) and len(train_losses(a.out_dir)) == 30


def test_end_to_end_is_one_module_on_plain_cross_entropy(tiny) -> None:
    summary = run_single(tiny(*MAN, "train.regime=e2e"), console_summary=False)
    assert [m["num_steps"] for m in summary["modules"]] == [10] and "aux_params" not in summary["modules"][0]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (["train.regime=sequential"], "objective.name=man does not train in train.regime=sequential"),
        (["objective.kwargs={every: 0}"], "objective.kwargs.every must be a whole number of steps"),
        (["pipeline.replicas=2"], "takes the next module's weights, which replicas do not exchange yet"),
        (["objective.kwargs={momentum: 1.5}"], r"objective.kwargs.momentum must be a number in \[0, 1\]"),
        (["objective.kwargs={weights: [1, 2, 3]}"], r"objective.kwargs.weights=\[1, 2, 3\]: give"),
        (["objective.kwargs={head: 3c}"], "objective.kwargs.head='3c' is not MAN's"),
    ],
)
def test_bad_settings_are_refused_in_one_line(tiny, bad: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run_single(tiny(*MAN, *bad), console_summary=False)
