from __future__ import annotations

import torch

from trgl_pipe.context import build_context


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
