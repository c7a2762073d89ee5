"""The kinetic energy's rounding: as accurate as mean(r**2), the authors' gradients bit for bit,
and runs started from given initial weights (model.init_state)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trgl_pipe.config import ConfigError, TrglConfig
from trgl_pipe.context import build_context
from trgl_pipe.models.blocks import add_with_energy, kinetic_energy, sum_of_squares
from trgl_pipe.models.initial_state import save_initial_state
from trgl_pipe.objectives.trgl import LocalObjective


def _relative_error(value: torch.Tensor, r: torch.Tensor) -> float:
    exact = float((r.double() ** 2).mean())
    return abs(float(value) - exact) / exact


# The bound on the partial dots' relative error against float64. On this 4.2M-element residual
# they measure 1.1e-8 to 3.2e-8 under the ATen and oneDNN kernel settings of an Intel CPU, and
# 1.07e-7 on an AMD EPYC (its bmm accumulates the 1024-element dots in another order); one float32
# dot over the whole tensor, the defect this guards against, loses 2.9e-6 (fp32) and 2.3e-5 (bf16)
# here. 5e-7 sits 4.7x above the worst CPU and 5.9x below the defect.
SUM_RTOL = 5e-7


@pytest.mark.golden
def test_sum_of_squares_is_as_accurate_as_float64_rounded_once() -> None:
    # 4.2M elements with a non-zero mean, as a post-BN residual has: one float32 dot product
    # loses ~3e-6 here; the partial dots keep to a few roundings of float32.
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(64, 16, 64, 64, generator=gen) * 0.3 + 0.1
    flat = r.reshape(-1)
    assert _relative_error(torch.dot(flat, flat) / flat.numel(), r) > 5 * SUM_RTOL  # the defect is seen
    assert _relative_error(kinetic_energy(r, "mean"), r) < SUM_RTOL
    tail = flat[: 5 * 1024 + 17]  # partial dots plus a tail
    exact = float((tail.double() ** 2).sum())
    assert abs(float(sum_of_squares(tail)) - exact) / exact < SUM_RTOL
    assert sum_of_squares(tail).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r16 = r.bfloat16()
        assert _relative_error(kinetic_energy(r16, "mean"), r16) < SUM_RTOL


@pytest.mark.golden
@pytest.mark.parametrize("shape", [(7, 16, 32, 32), (64, 16, 36, 36), (3, 5, 7, 7)])
def test_gradients_are_those_of_mean_r_squared_bit_for_bit(shape: tuple[int, ...]) -> None:
    # n is not a power of two in the first two shapes: 2 g / n is then rounded, and must be
    # rounded as autograd of mean(r**2) rounds it, with the authors' τ division
    gen = torch.Generator().manual_seed(1)
    skip, r0, g = (torch.randn(shape, generator=gen) for _ in range(3))
    for tau in (0.5, 1.0, 3.0, 100.0):
        objective = LocalObjective(TrglConfig(tau=tau), 0, 1, torch.device("cpu"))
        r = r0.clone().requires_grad_(True)
        s, energy = add_with_energy(skip, r, "mean")
        objective((s * g).sum(), energy).backward()
        theirs_r = r0.clone().requires_grad_(True)
        theirs_s = skip + theirs_r
        transport = sum([torch.mean(theirs_r**2)])
        ((theirs_s * g).sum() + transport / (2 * tau)).backward()
        assert torch.equal(r.grad, theirs_r.grad), tau


def test_a_run_starts_from_given_initial_weights(tiny, tmp_path: Path) -> None:
    source = build_context(tiny("seed=5"), torch.device("cpu"))
    stages = [source.build_stage(k) for k in range(source.num_modules)]
    path = tmp_path / "init.pt"
    save_initial_state(path, [(s.body, s.head) for s in stages])
    other = build_context(tiny("seed=0", f"model.init_state={path}"), torch.device("cpu"))
    plain = build_context(tiny("seed=0"), torch.device("cpu")).build_stage(1)
    loaded = other.build_stage(1)
    theirs, ours = stages[1].body.state_dict(), loaded.body.state_dict()
    assert list(theirs) == list(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    heads = zip(stages[1].head.parameters(), loaded.head.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in heads)
    bodies = zip(plain.body.parameters(), loaded.body.parameters(), strict=True)
    assert not all(torch.equal(a, b) for a, b in bodies)


def test_a_bad_initial_state_names_the_key(tiny, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.init_state=.*no such file"):
        build_context(tiny(f"model.init_state={tmp_path / 'none.pt'}"), torch.device("cpu")).build_stage(0)
    three = build_context(tiny("model.num_modules=3"), torch.device("cpu"))
    path = tmp_path / "three.pt"
    save_initial_state(path, [(s.body, s.head) for s in map(three.build_stage, range(3))])
    with pytest.raises(ConfigError, match="holds 3 modules, the run has 2"):
        build_context(tiny(f"model.init_state={path}"), torch.device("cpu")).build_stage(0)
    wide = build_context(tiny("model.width=8"), torch.device("cpu"))
    save_initial_state(path, [(s.body, s.head) for s in map(wide.build_stage, range(2))])
    with pytest.raises(ConfigError, match="module 0 body does not match"):
        build_context(tiny(f"model.init_state={path}"), torch.device("cpu")).build_stage(0)
    torch.save({"weights": 1}, path)
    with pytest.raises(ConfigError, match="one entry per module"):
        build_context(tiny(f"model.init_state={path}"), torch.device("cpu")).build_stage(0)
