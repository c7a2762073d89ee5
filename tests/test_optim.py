"""LR schedules: the run-long cosine with a floor, and the authors' fixed-horizon cosine."""

from __future__ import annotations

import math

import pytest
import torch

from trgl_pipe.config import ConfigError, OptimConfig, load_config
from trgl_pipe.optim import build_optimizer, build_scheduler


def _rates(cfg: OptimConfig, total_steps: int, steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([param], cfg)
    sched = build_scheduler(opt, cfg, total_steps, steps_per_epoch=10)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def test_run_long_cosine_ends_at_the_floor() -> None:
    cfg = OptimConfig(lr=0.1, min_lr=0.01)
    rates = _rates(cfg, total_steps=100, steps=101)
    assert rates[0] == pytest.approx(0.1)
    assert rates[50] == pytest.approx(0.055)
    assert rates[100] == pytest.approx(0.01)
    assert min(rates) == pytest.approx(0.01)


def test_fixed_horizon_cosine_is_the_authors_scheduler_float_for_float() -> None:
    # their scripts: CosineAnnealingLR(optimizer, 30000, 0.001) stepped after every optimizer step
    cfg = OptimConfig(lr=0.1, schedule_steps=300, min_lr=1e-3)
    ours = _rates(cfg, total_steps=40, steps=700)
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    theirs_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300, 0.001)
    theirs = []
    for _ in range(700):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        theirs_sched.step()
    assert ours == theirs  # the same floats, not only close
    # the horizon is the key's, not the run's (40 steps here): the rate barely moves in 40 steps
    assert ours[40] == pytest.approx(1e-3 + (0.1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * 40 / 300)))
    assert ours[300] == pytest.approx(1e-3)
    assert ours[600] == pytest.approx(0.1)  # torch's schedule is periodic past T_max


def test_fixed_horizon_survives_a_checkpoint() -> None:
    cfg = OptimConfig(lr=0.1, schedule_steps=50, min_lr=1e-3)
    param = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([param], cfg)
    sched = build_scheduler(opt, cfg, 100, 10)
    for _ in range(20):
        opt.step()
        sched.step()
    state = (opt.state_dict(), sched.state_dict())
    param2 = torch.nn.Parameter(torch.zeros(3))
    opt2 = build_optimizer([param2], cfg)
    sched2 = build_scheduler(opt2, cfg, 100, 10)
    opt2.load_state_dict(state[0])
    sched2.load_state_dict(state[1])
    for _ in range(10):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["optim.schedule_steps=100", "optim.schedule=constant"], "optim.schedule_steps applies"),
        (["optim.schedule_steps=100", "optim.warmup_epochs=1"], "optim.schedule_steps applies"),
        (["optim.schedule_steps=0"], "optim.schedule_steps"),
        (["optim.min_lr=0.5", "optim.lr=0.1"], "optim.min_lr=0.5 must not exceed"),
        (["optim.min_lr=-1"], "optim.min_lr"),
        (["data.crop_padding=-1"], "data.crop_padding"),
    ],
)
def test_bad_schedule_keys_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)
