from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trgl_pipe.config import TrglConfig
from trgl_pipe.models import PreActBlock
from trgl_pipe.objectives.trgl import LocalObjective, tau_for_module
from trgl_pipe.stage import ModuleBody

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (1, [1.0]),
        (2, [1.0, 2.0]),
        (3, [1.0, 1.0, 2.0]),
        (4, [1.0, 1.0, 2.0, 2.0]),
        (5, [1.0, 1.0, 1.0, 2.0, 2.0]),
    ],
)
def test_halves_doubles_tau_in_the_second_half(k: int, expected: list[float]) -> None:
    assert [tau_for_module(i, k, 1.0, "halves") for i in range(k)] == expected


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_constant_tau(k: int) -> None:
    assert [tau_for_module(i, k, 0.5, "constant") for i in range(k)] == [0.5] * k


def test_local_loss_by_hand_on_a_tiny_block() -> None:
    torch.manual_seed(0)
    block = PreActBlock(2, 2).train()
    body = ModuleBody(None, [block], 0)
    head = torch.nn.Linear(2 * 3 * 3, 4)
    x, y = torch.randn(5, 2, 3, 3), torch.randint(0, 4, (5,))
    tau = 0.25
    objective = LocalObjective(TrglConfig(tau=tau), index=0, num_modules=1, device=CPU)
    out, kinetic = body(x)
    loss = objective(F.cross_entropy(head(out.flatten(1)), y), kinetic)
    # by hand, from the same block in the same mode
    torch.manual_seed(0)
    block2 = PreActBlock(2, 2).train()
    block2.load_state_dict(block.state_dict())
    pre = F.relu(block2.bn1(x))
    r = block2.conv2(F.relu(block2.bn2(block2.conv1(pre))))
    c = (r**2).sum(dim=(1, 2, 3)).mean()
    expected = F.cross_entropy(head((x + r).flatten(1)), y) + c / (2 * tau)
    torch.testing.assert_close(kinetic, c)
    torch.testing.assert_close(loss, expected)


def test_vangl_drops_the_transport_term() -> None:
    objective = LocalObjective(TrglConfig(enabled=False), 0, 2, CPU)
    ce, kinetic = torch.tensor(1.5), torch.tensor(100.0)
    assert objective(ce, kinetic).item() == 1.5


def test_lambda_follows_the_method_of_multipliers() -> None:
    cfg = TrglConfig(tau_schedule="adaptive", lambda_init=1.0, h=0.5, s=2)
    objective = LocalObjective(cfg, 0, 2, CPU)
    kinetic = torch.tensor(4.0)
    ces = [1.0, 2.0, 3.0, 4.0, 5.0]
    lams, losses = [], []
    for ce in ces:
        losses.append(objective(torch.tensor(ce), kinetic).item())
        lams.append(objective.lam.item())
    # λ_{i+1} = λ_i + h·L(θ_{i+1}, x_{i+1}) after steps i with i mod s = 0 (i counted from 1):
    # the CE of step 3 updates λ before step 3's loss is formed, then step 5's.
    assert lams == [1.0, 1.0, 2.5, 2.5, 5.0]
    assert losses == pytest.approx([1 + 4 / 1.0, 2 + 4 / 1.0, 3 + 4 / 2.5, 4 + 4 / 2.5, 5 + 4 / 5.0])
    assert objective.describe() == {"tau": None, "lambda": 5.0}


def test_lambda_state_round_trips() -> None:
    cfg = TrglConfig(tau_schedule="adaptive", lambda_init=1.0, h=1.0, s=1)
    a = LocalObjective(cfg, 0, 2, CPU)
    for ce in (1.0, 2.0, 3.0):
        a(torch.tensor(ce), torch.tensor(0.0))
    b = LocalObjective(cfg, 0, 2, CPU)
    b.load_state_dict(a.state_dict())
    assert b.lam.item() == a.lam.item() and b.num_steps == a.num_steps
