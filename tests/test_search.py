"""SEDONA's search: the relaxed gradient, the meta-gradient against finite differences, a seeded
search that repeats and resumes bit for bit, its file as an override, the planner's view of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TINY, run_here

from trgl_pipe.config import load_config
from trgl_pipe.errors import ConfigError, UserError
from trgl_pipe.search.__main__ import main as search_main
from trgl_pipe.search.loop import SearchOptions, build_network, run_search
from trgl_pipe.search.meta import InnerSGD, Lookahead, gate_weights, relaxed_gradient
from trgl_pipe.search.result import decide


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread, as a run with train.num_threads=1 has (two threads on two busy cores are many
    times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# three blocks (two gaps), heads of depth 1-2, 8x8 inputs: a float64 meta-gradient in a second
SMALL = ["model.depth=8", "model.width=3", "aux.channels=6", "model.num_modules=2"]


def _small_problem(seed: int = 0):
    torch.set_default_dtype(torch.float64)
    try:
        cfg = load_config(None, SMALL)
        net = build_network(cfg, 3, (1, 8, 8), 2, 0.1).double()
    finally:
        torch.set_default_dtype(torch.float32)
    gen = torch.Generator().manual_seed(seed)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(5, 1, 8, 8, generator=gen, dtype=torch.float64), torch.randint(
            0, 3, (5,), generator=gen
        )

    steps, valid = [batch() for _ in range(3)], batch()
    params = {k: v.detach() for k, v in net.named_parameters()}
    momenta = {k: 0.1 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
    alpha = torch.randn(net.num_gaps, 2, generator=gen, dtype=torch.float64)
    beta = torch.randn(net.num_gaps, 2, generator=gen, dtype=torch.float64)
    return net, params, momenta, alpha, beta, steps, valid


@pytest.mark.parametrize("objective", ["valid", "train"])
def test_the_meta_gradient_matches_finite_differences(objective: str) -> None:
    net, params, momenta, alpha, beta, steps, valid = _small_problem()
    sgd = InnerSGD(lr=0.1, momentum=0.9, weight_decay=1e-3)
    lookahead = Lookahead(net, params, momenta, steps, valid, sgd, objective)
    g_alpha, g_beta, value = lookahead.gradient(alpha, beta)

    def f(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(lookahead.value(a, b))

    assert float(value) == pytest.approx(f(alpha, beta), rel=1e-12)
    eps = 1e-6
    for which, grad, base in (("alpha", g_alpha, alpha), ("beta", g_beta, beta)):
        numeric = torch.zeros_like(base)
        for index in [(i, j) for i in range(base.shape[0]) for j in range(base.shape[1])]:
            step = torch.zeros_like(base)
            step[index] = eps
            plus = f(alpha + step, beta) if which == "alpha" else f(alpha, beta + step)
            minus = f(alpha - step, beta) if which == "alpha" else f(alpha, beta - step)
            numeric[index] = (plus - minus) / (2 * eps)
        assert numeric.abs().max() > 1e-5  # the objective does depend on them
        torch.testing.assert_close(grad, numeric, rtol=1e-4, atol=1e-8)


def test_a_block_moves_by_the_losses_its_gaps_let_through() -> None:
    """Block j's gradient is Σ_{i ≥ j} a_cut(i) Π_{j ≤ l < i} a_pass(l) ∂L_i/∂θ_j, and gap i's
    heads get ∂L_i at full weight (each L_i's gradient taken on its own here)."""
    from torch.func import functional_call

    net, params, _, alpha, beta, steps, _ = _small_problem(1)
    x, y = steps[0]
    cut, passing, mix = gate_weights(alpha, beta)
    got = relaxed_gradient(net, params, alpha, beta, (x, y))
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    losses, logits = functional_call(net, p, (x, y, mix))
    all_losses = [*losses, torch.nn.functional.cross_entropy(logits, y)]
    per_loss = [
        torch.autograd.grad(loss, list(p.values()), allow_unused=True, retain_graph=True)
        for loss in all_losses
    ]
    groups = net.parameter_groups()
    last = len(all_losses) - 1
    for n, name in enumerate(p):
        kind, j = groups[name]
        want = torch.zeros_like(params[name])
        for i, grads in enumerate(per_loss):
            if grads[n] is None or (kind == "head" and i != j):
                continue
            if kind == "head":
                want = want + grads[n]
                continue
            weight = cut[i] if i < last else torch.ones(())
            for gap in range(j, i):
                weight = weight * passing[gap]
            want = want + weight * grads[n]
        torch.testing.assert_close(got[name], want, rtol=1e-10, atol=1e-12)


def test_a_gap_whose_cut_weight_is_one_stops_the_gradient_from_above() -> None:
    net, params, _, alpha, beta, steps, _ = _small_problem(2)
    alpha = torch.tensor([[60.0, -60.0], [0.0, 0.0]], dtype=torch.float64)  # gap 0: a cut
    got = relaxed_gradient(net, params, alpha, beta, steps[0])
    # block 0 then sees L_0 only: its gradient equals that of a network with gap 1 and above gone
    from torch.func import functional_call, grad

    _, _, mix = gate_weights(alpha, beta)

    def first_loss(p: dict) -> torch.Tensor:
        return functional_call(net, p, (*steps[0], mix))[0][0]

    want = grad(first_loss)(params)
    for name, (kind, j) in net.parameter_groups().items():
        if kind == "block" and j == 0:
            torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12)


def test_the_decision_takes_the_highest_cut_weights_and_the_likeliest_depths() -> None:
    alpha = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    beta = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [5.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0, 0, 0.0]])
    decision = decide(alpha, beta, num_modules=3, last_depth=2)
    assert decision.split == [2, 4]  # gaps 1 and 3 (tied at the top: both taken), modules start after them
    assert decision.depths == [3, 2, 2]
    assert decide(alpha, beta, num_modules=2).split == [2]  # the tie goes to the earlier gap
    with pytest.raises(ConfigError, match="num_modules=7"):
        decide(alpha, beta, num_modules=7)


SEARCH = [
    *TINY,
    "model.depth=8",
    "model.width=4",
    "aux.channels=8",
    "model.num_modules=2",
    "data.batch_size=16",
]
OPTIONS = SearchOptions(budget=4, inner_steps=2, max_depth=2, save_every=1)


def _search(out: Path, *extra: str, options: SearchOptions = OPTIONS, **kwargs):
    return run_search(load_config(None, [*SEARCH, *extra]), options, out, ["test"], **kwargs)


def test_a_search_repeats_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    first = _search(tmp_path / "a.yaml")
    assert first is not None and len(first.split) == 1
    again = _search(tmp_path / "b.yaml")
    assert _search(tmp_path / "c.yaml", stop_after=2) is None
    assert (tmp_path / "c.state.pt").is_file() and not (tmp_path / "c.yaml").exists()
    with pytest.raises(UserError, match="--resume"):
        _search(tmp_path / "c.yaml")
    with pytest.raises(UserError, match="another config or other options"):
        _search(tmp_path / "c.yaml", "optim.lr=0.05", resume=True)
    resumed = _search(tmp_path / "c.yaml", resume=True)
    assert not (tmp_path / "c.state.pt").exists()
    records = [json.loads((tmp_path / f"{n}.json").read_text()) for n in "abc"]
    for record in records[1:]:
        assert record["alpha"] == records[0]["alpha"] and record["beta"] == records[0]["beta"]
        assert record["meta_objective"] == records[0]["meta_objective"]
    assert first == again == resumed
    other = _search(tmp_path / "d.yaml", "seed=5")
    assert json.loads((tmp_path / "d.json").read_text())["alpha"] != records[0]["alpha"]
    assert other is not None
    moved = torch.tensor(records[0]["alpha"])
    assert moved.abs().max() > 0  # the meta-steps moved α
    with pytest.raises(UserError, match="exists already"):
        _search(tmp_path / "a.yaml")


def test_the_search_file_is_an_override_a_run_trains_with(tmp_path: Path, capsys) -> None:
    out = tmp_path / "search.yaml"
    code = search_main(
        [
            *SEARCH,
            "model.num_modules=3",
            "--budget",
            "2",
            "--inner-steps",
            "1",
            "--max-depth",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    text = out.read_text()
    assert "# *" in text  # the chosen gaps are marked among the scores
    keys = yaml.safe_load(text)
    assert keys["aux"]["type"] == "sedona" and len(keys["model"]["split"]) == 2
    cfg = load_config(None, [*SEARCH, str(out)])
    assert cfg.model.split == keys["model"]["split"] and cfg.aux.depth == keys["aux"]["depth"]
    assert cfg.model.num_modules == 3
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["cpu_s"] > 0 and record["options"]["budget"] == 2
    run = tmp_path / "run"
    done = run_here([*SEARCH, str(out), "train.epochs=1", f"out_dir={run}"], capsys)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    starts = [a for a, _ in summary["partition"]][1:]
    assert starts == keys["model"]["split"]

    from trgl_pipe.plan import main as plan_main

    capsys.readouterr()
    quickstart = str(ROOT / "configs" / "quickstart.yaml")
    assert plan_main([quickstart, *SEARCH, "model.num_modules=3", "--gpus", "3", "--search", str(out)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"searched", "depth", "balanced"}
    cuts = ", ".join(map(str, keys["model"]["split"]))
    assert f"[{cuts}]" in rows["searched"] and "sedona" in rows["searched"]
    assert "[1, 2]" in rows["depth"] and "conv" in rows["depth"]  # 3 blocks, K = 3
    weight = sum(record["decision"]["cut_scores"][c - 1] for c in keys["model"]["split"]) / 2
    assert rows["searched"].split()[-1] == f"{weight:.3f}"


def test_bad_search_input_gets_one_line(tmp_path: Path, capsys) -> None:
    def error(*args: str) -> str:
        capsys.readouterr()
        assert search_main([*SEARCH, *args, "--out", str(tmp_path / "s.yaml")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0
        return err

    assert "--budget 0 must be at least 1" in error("--budget", "0")
    assert "--valid-fraction 1.5" in error("--valid-fraction", "1.5")
    assert "model.num_modules must be at least 2" in error("model.num_modules=1")
    assert "unknown config key" in error("model.nope=1")
    missing = tmp_path / "missing.yaml"
    assert str(missing) in error(str(missing))


@pytest.mark.parametrize(
    ("arch", "modules"), [("tests.user_pkg.nets:resnet", 3), ("resnet18", 4), ("vgg11_bn", 2)]
)
def test_the_search_runs_on_a_users_network_and_on_torchvision_backbones(
    tmp_path: Path, arch: str, modules: int
) -> None:
    out = tmp_path / "search.yaml"
    small = ["data.name=synthetic", "data.train_size=48", "data.test_size=8", "data.image_size=32"]
    overrides = [*small, "data.val_size=8", "data.batch_size=8", "aux.channels=8", f"model.arch={arch}"]
    cfg = load_config(None, [*overrides, f"model.num_modules={modules}", "train.num_threads=1"])
    decision = run_search(cfg, SearchOptions(budget=1, inner_steps=1, max_depth=2), out, ["test"])
    assert decision is not None and len(decision.split) == modules - 1
    assert load_config(None, [*overrides, str(out)]).model.split == decision.split
    if arch.endswith(":resnet"):  # 3 blocks: K = 4 is refused in one line naming the limit
        with pytest.raises(ConfigError, match="use at most 3 modules"):
            run_search(load_config(None, overrides), SearchOptions(budget=1), tmp_path / "x.yaml", [])


def test_ctrl_c_keeps_the_last_saved_step_and_resume_finishes_the_same_search(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    budget = 6
    options = ["--budget", str(budget), "--inner-steps", "2", "--max-depth", "2", "--save-every", "1"]
    out = tmp_path / "s.yaml"
    command = [sys.executable, "-m", "trgl_pipe.search", *SEARCH, *options, "--out", str(out)]
    # Ctrl-C as a terminal delivers it: a suite started in the background inherits SIGINT ignored
    # (bash ignores it in background jobs), and the search would then run to its end
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore
    )
    state = out.with_suffix(".state.pt")
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.exists(), process.communicate()[1][-2000:]
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "add --resume" in err, err[-2000:]
    assert not out.exists() and state.exists()
    resumed = subprocess.run([*command, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = _search(tmp_path / "whole.yaml", options=SearchOptions(budget=budget, inner_steps=2, max_depth=2))
    assert whole is not None
    record, reference = (
        json.loads(p.with_suffix(".json").read_text()) for p in (out, tmp_path / "whole.yaml")
    )
    assert record["alpha"] == reference["alpha"] and record["beta"] == reference["beta"]


def test_sedonas_memory_repeats_and_resumes_bit_for_bit_and_changes_the_search(tmp_path: Path) -> None:
    import dataclasses

    options = dataclasses.replace(OPTIONS, memory=2, warmup=4)
    whole = _search(tmp_path / "a.yaml", options=options)
    assert _search(tmp_path / "b.yaml", options=options, stop_after=2) is None
    state = torch.load(tmp_path / "b.state.pt", weights_only=True)
    assert [s["position"] for s in state["search"]["memory"]] != [2, 4]  # the memory moved on
    assert len(state["search"]["memory"]) == 2
    resumed = _search(tmp_path / "b.yaml", options=options, resume=True)
    plain = _search(tmp_path / "c.yaml")
    records = [json.loads((tmp_path / f"{n}.json").read_text()) for n in "abc"]
    assert whole == resumed and records[0]["alpha"] == records[1]["alpha"]
    assert records[0]["beta"] == records[1]["beta"]
    assert records[0]["alpha"] != records[2]["alpha"] and plain is not None
    with pytest.raises(UserError, match="--warmup at least"):
        dataclasses.replace(OPTIONS, memory=3, warmup=2).check()
