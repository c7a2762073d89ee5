from __future__ import annotations

import copy

import pytest
import torch

from trgl_pipe.context import build_context
from trgl_pipe.models import kinetic_energy


def _stages(cfg):
    ctx = build_context(cfg, torch.device("cpu"))
    return ctx, [ctx.build_stage(i) for i in range(ctx.num_modules)]


def test_no_gradient_reaches_an_earlier_module(tiny) -> None:
    ctx, (first, second) = _stages(tiny())
    x, y = next(ctx.batches.train_batches(0))
    out = first.train_step(x, y)
    assert not out.requires_grad
    first.optimizer.zero_grad(set_to_none=True)
    second.train_step(out, y)
    assert all(p.grad is None for p in first.parameters())
    assert all(p.grad is not None for p in second.parameters())


def test_frozen_modules_keep_weights_and_batchnorm_statistics(tiny) -> None:
    ctx, (first, second) = _stages(tiny())
    batches = list(ctx.batches.train_batches(0))
    for x, y in batches[:2]:
        first.train_step(x, y)
    before = {k: v.clone() for k, v in first.body.state_dict().items()}
    for x, y in batches:
        second.train_step(first.forward_frozen(x), y)
    after = first.body.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen module changed"
    assert any("running_mean" in k for k in before)


def test_eval_counts_correct_predictions(tiny) -> None:
    ctx, (first, _) = _stages(tiny())
    x, y = next(ctx.batches.eval_batches("test"))
    first.eval_step(x, y, "test")
    results = first.pop_eval_results()["test"]
    assert results["count"] == len(y)
    with torch.no_grad():
        first.body.eval()
        first.head.eval()
        out, _ = first.body(x)
        manual = int((first.head(out).argmax(1) == y).sum()) / len(y)
    assert results["accuracy"] == manual


@pytest.mark.parametrize("block", ["preact", "postact"])
@pytest.mark.parametrize(("reduction", "tau"), [("sum", 10.0), ("mean", 1e-3)])
def test_the_kinetic_gradient_reaches_every_block_through_a_training_step(
    tiny, block, reduction, tau
) -> None:
    # One train_step with TRGL and one without, from the same weights on the same batch: the
    # difference of their gradients is the gradient of C/(2 tau) alone, computed here by autograd
    # from the plain formula. Module 0 of a ResNet-14 holds the stem and blocks 0-2; block 2
    # downsamples (stride 2, 4 -> 8 channels).
    common = [f"model.block={block}", f"trgl.reduction={reduction}", f"trgl.tau={tau}"]
    ctx, (trgl, _) = _stages(tiny(*common))
    _, (vangl, _) = _stages(tiny(*common, "trgl.enabled=false"))
    reference = copy.deepcopy(trgl.body)
    assert {type(b).__name__ for b in trgl.body.blocks} == {
        "PreActBlock" if block == "preact" else "PostActBlock"
    }
    assert trgl.body.blocks[2].conv1.stride == (2, 2)
    x, y = next(ctx.batches.train_batches(0))
    trgl.train_step(x, y)
    vangl.train_step(x, y)
    reference.train()
    h = reference.stem(x)
    energy = h.new_zeros(())
    for b in reference.blocks:
        h, (r,) = b(h)
        energy = energy + kinetic_energy(r, reduction)
    expected = torch.autograd.grad(energy / (2 * tau), list(reference.parameters()), allow_unused=True)
    names = [n for n, _ in reference.named_parameters()]
    # float32: a weight gradient sums ~10^5 products, so the two runs' gradients differ by rounding
    # of the order of 1e-4 of their size; 1e-3 of it is the tolerance, and the kinetic part itself
    # must exceed it, so a missing kinetic gradient cannot pass
    pairs = zip(trgl.body.parameters(), vangl.body.parameters(), strict=True)
    for name, (pa, pb), e in zip(names, pairs, expected, strict=True):
        e = torch.zeros_like(pa) if e is None else e
        tolerance = 1e-3 * float(pa.grad.abs().max())
        assert float((pa.grad - pb.grad - e).abs().max()) <= tolerance, name
        if name.endswith(("conv1.weight", "conv2.weight")):
            assert float(e.abs().max()) > 3 * tolerance, f"the kinetic gradient of {name} is lost in rounding"


def test_e2e_and_parallel_with_one_module_are_the_same_computation(tiny) -> None:
    from pathlib import Path

    from trgl_pipe.folder.checkpoint import latest_complete
    from trgl_pipe.training.single import run_single
    from trgl_pipe.watch.metrics import read_metrics

    runs = [tiny("train.regime=e2e", "trgl.enabled=false"), tiny("model.num_modules=1", "trgl.enabled=false")]
    summaries = [run_single(cfg, console_summary=False) for cfg in runs]

    def steps(cfg) -> list:
        events = read_metrics(Path(cfg.out_dir) / "metrics.jsonl")
        return [(e["step"], e["loss"], e["ce"], e["accuracy"]) for e in events if e["event"] == "train"]

    assert len(steps(runs[0])) == 10 and steps(runs[0]) == steps(runs[1])  # every step, bitwise
    a, b = (
        torch.load(latest_complete(cfg.out_dir) / "module-0.pt", weights_only=True)["stage"] for cfg in runs
    )
    for part in ("body", "head"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert summaries[0]["modules"][0]["test_accuracy"] == summaries[1]["modules"][0]["test_accuracy"]
