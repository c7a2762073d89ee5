"""Training through native code that has crashed before (oneDNN kernels, torch.compile).

Each run is its own process (the CLI), so a native crash (SIGABRT, SIGSEGV, SIGBUS) fails the one
test with its output instead of ending the whole test session. See docs/known-issues.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import cli_args, run_cli

pytestmark = pytest.mark.slow


def _per_step(out: Path) -> dict[tuple[int, int], tuple[float, float, float]]:
    """(module, step) -> (loss, CE, kinetic energy) of every training step."""
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        (e["module"], e["step"]): (e["loss"], e["ce"], e["kinetic"]) for e in events if e["event"] == "train"
    }


def _ok(result) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )


@pytest.mark.parametrize(
    "options",
    [
        ["train.channels_last=true"],
        ["train.compile=true"],
        ["train.channels_last=true", "model.block=postact"],
    ],
    ids=["channels_last", "compile", "channels_last-postact"],
)
def test_narrow_resnet_trains_with_onednn_avx2_kernels(tmp_path: Path, options: list[str]) -> None:
    # The configuration that aborted CI on AMD EPYC (AVX2): width 4, so the first downsampling
    # block has a strided 1x1 shortcut with 4 input channels, channels_last (chosen by inductor
    # under compile). ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN use its AVX2 kernels on any x86 CPU.
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    args = cli_args(
        f"out_dir={tmp_path / 'run'}", "data.train_size=128", "model.depth=8", "train.epochs=1", *options
    )
    result = run_cli(args, env=env)
    _ok(result)
    losses = _per_step(tmp_path / "run")
    assert len(losses) == 2 * 2 and all(v == v for step in losses.values() for v in step)  # 2 modules, no NaN


# The two tests of compiled stages build the same network (COMPILED) and see the same batch
# sizes (64, a last one of 44, evaluation 100), so they share one inductor cache: whichever runs
# second finds its kernels compiled (the graph count it checks is dynamo's, which a cache hit
# does not change). The xdist group keeps them on one worker.
COMPILED = ["model.depth=8", "model.width=8"]


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path_factory.mktemp("inductor"))}


@pytest.mark.xdist_group("compiled")
def test_compiled_modules_compute_what_eager_modules_compute(tmp_path: Path, inductor_cache) -> None:
    # Width 8 (no channel count below oneDNN's AVX2 block), 5 steps per epoch, 2 epochs, both
    # modules, TRGL on. Compiled and eager kernels round differently, and training amplifies the
    # rounding: measured on 2 CPUs, torch 2.14.1, with 320 training images (five full batches),
    # the largest relative gap over these 20 steps was 4e-5 (2e-6 on the first step of each
    # module); the 300 images used now (a last batch of 44, to share the warm-up test's kernels)
    # pass the same bounds, not re-measured. A compiled stage that dropped the kinetic term
    # (a 2% change of the loss here) or computed a wrong gradient moves the losses by 1e-2 or more.
    common = [*COMPILED, "train.epochs=2"]
    eager = run_cli(cli_args(f"out_dir={tmp_path / 'eager'}", *common))
    _ok(eager)
    env = inductor_cache
    compiled = run_cli(cli_args(f"out_dir={tmp_path / 'compiled'}", *common, "train.compile=true"), env=env)
    _ok(compiled)
    a, b = _per_step(tmp_path / "eager"), _per_step(tmp_path / "compiled")
    assert sorted(a) == sorted(b) and len(a) == 2 * 10
    for key in a:
        rtol = 1e-5 if key[1] == 1 else 1e-3
        for name, x, y in zip(("loss", "ce", "kinetic"), a[key], b[key], strict=True):
            assert abs(x - y) <= rtol * abs(x), (key, name, x, y)


@pytest.mark.parametrize(
    "options",
    [
        ["train.precision=bf16"],
        ["train.channels_last=true"],
        ["train.precision=bf16", "train.channels_last=true"],
    ],
    ids=["bf16", "channels_last", "bf16-channels_last"],
)
def test_speed_options_train(tmp_path: Path, options: list[str]) -> None:
    args = cli_args(
        f"out_dir={tmp_path / 'run'}",
        "train.epochs=1",
        "data.train_size=600",
        "model.width=8",
        "log.every_steps=5",
        *options,
    )
    _ok(run_cli(args))
    losses = _per_step(tmp_path / "run")
    for module in (0, 1):
        ce = [losses[key][1] for key in sorted(losses) if key[0] == module]
        assert all(v == v for v in ce) and ce[-1] < ce[0], (module, ce)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_test_accuracy"] > 0.2


WARM_UP_SCRIPT = """
import sys, torch
from torch._dynamo.utils import counters
from trgl_pipe.config import load_config
from trgl_pipe.context import build_context
cfg = load_config(None, sys.argv[1:])
torch.set_num_threads(1)
ctx = build_context(cfg, torch.device("cpu"))
stage = ctx.build_stage(1)
x0 = torch.zeros(1, *ctx.input_shape)
shape = tuple(ctx.build_stage(0).forward_frozen(x0).shape[1:])
stage.forward_frozen(torch.zeros(1, *shape))  # the handshake's probe
# the sizes of this run: batches of 64 and a last one of 44; evaluation 100 then 100 (test: 200)
stage.warm_up(shape, torch.float32, [64, 44], [100, 100])
compiled = counters["stats"]["unique_graphs"]
for n in (64, 44, 64):
    stage.train_step(torch.randn(n, *shape), torch.randint(0, 10, (n,)))
for n in (100, 100):
    stage.eval_step(torch.randn(n, *shape), torch.randint(0, 10, (n,)), "val")
stage.pop_eval_results()
print("graphs", compiled, counters["stats"]["unique_graphs"])
"""


@pytest.mark.xdist_group("compiled")
def test_a_compiled_stage_compiles_nothing_after_its_warm_up(tmp_path: Path, inductor_cache) -> None:
    # torch.compile is lazy: without the warm-up the first step, first evaluation and first partial
    # batch each compile while the neighbours' waits run
    import subprocess
    import sys

    from conftest import ROOT

    env = inductor_cache
    args = cli_args(f"out_dir={tmp_path / 'run'}", *COMPILED, "train.compile=true")
    result = subprocess.run(
        [sys.executable, "-c", WARM_UP_SCRIPT, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, before, after = result.stdout.split()[-3:]
    assert int(before) > 0 and int(after) == int(before), result.stdout


def test_bf16_tracks_fp32_within_its_precision(tmp_path: Path) -> None:
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2% per operation). The first two
    # steps start from the same weights (the second after one update), so their losses differ by
    # rounding only (measured: <= 0.1% for CE, 0.2% for the kinetic energy); from the third step
    # the chaotic training at lr 0.1 on 64-image batches lets the runs drift apart (11% at step 5
    # measured), so later steps are compared through the mean loss of the run, which moved 3%. A
    # broken bf16 path (a cast dropped, a NaN, a wrong scale) moves these by far more.
    common = ["data.train_size=320", "model.width=8", "train.epochs=2"]
    fp32 = run_cli(cli_args(f"out_dir={tmp_path / 'fp32'}", *common))
    bf16 = run_cli(cli_args(f"out_dir={tmp_path / 'bf16'}", *common, "train.precision=bf16"))
    _ok(fp32)
    _ok(bf16)
    a, b = _per_step(tmp_path / "fp32"), _per_step(tmp_path / "bf16")
    assert sorted(a) == sorted(b) and len(a) == 2 * 10
    for module in (0, 1):
        for step in (1, 2):
            (_, ce_a, kin_a), (_, ce_b, kin_b) = a[(module, step)], b[(module, step)]
            assert abs(ce_a - ce_b) <= 0.01 * ce_a, (module, step, ce_a, ce_b)
            assert abs(kin_a - kin_b) <= 0.01 * kin_a, (module, step, kin_a, kin_b)
        mean_a = sum(a[(module, s)][0] for s in range(1, 11)) / 10
        mean_b = sum(b[(module, s)][0] for s in range(1, 11)) / 10
        assert abs(mean_a - mean_b) <= 0.1 * mean_a, (module, mean_a, mean_b)
