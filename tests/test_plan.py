"""The layout planner: its projection model by hand, and the command on a small config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, TINY

from trgl_pipe.plan import ModuleProfile, launch_lines, layouts, main, project


def _profiles() -> list[ModuleProfile]:
    # module k: (k+1) x 10 ms per step at the full batch of 64, (k+1) x 6 ms at 32, ...; 1 MB of
    # parameters; the per-replica batches of R = 1..4 are 64, 32, 22, 16
    seconds = {64: 0.010, 32: 0.006, 22: 0.0045, 16: 0.004}
    return [
        ModuleProfile(
            time_s={n: t * (k + 1) for n, t in seconds.items()},
            activation_bytes={n: 62_500 * n for n in seconds},
            param_bytes=1_000_000,
            input_features=100,
            output_features=50,
        )
        for k in range(4)
    ]


def test_the_projection_follows_its_stated_model() -> None:
    profiles = _profiles()
    one = project(profiles, m=1, r=1, batch=64, link_gbps=8.0, reader=None, buffers=2)
    assert one.stage_time_s == pytest.approx([0.010, 0.020, 0.030, 0.040])
    assert one.samples_per_s == pytest.approx(64 / 0.040)  # the slowest stage
    assert one.peak_bytes == 3 * 1_000_000 + 4_000_000 + 2 * 64 * (100 + 50) * 4
    two = project(profiles, m=2, r=2, batch=64, link_gbps=8.0, reader=None, buffers=2)
    assert two.stages == [[0, 1], [2, 3]]
    allreduce = 2 * (2 - 1) / 2 * 2_000_000 / 1e9  # ring all-reduce of 2 MB over 1 GB/s
    assert two.allreduce_s == pytest.approx([allreduce, allreduce])
    assert two.stage_time_s[1] == pytest.approx(0.006 * 3 + 0.006 * 4 + allreduce)
    assert two.samples_per_s == pytest.approx(64 / two.stage_time_s[1])
    capped = project(profiles, m=1, r=1, batch=64, link_gbps=8.0, reader=100.0, buffers=2)
    assert capped.reader_limited and capped.samples_per_s == pytest.approx(100.0)


def test_a_slow_link_between_stages_sets_the_rate_where_it_is_slower_than_every_stage() -> None:
    profiles = _profiles()  # each module outputs 50 values per sample
    fast = project(profiles, m=1, r=1, batch=64, link_gbps=8.0, reader=None, buffers=2)
    assert fast.link_s == pytest.approx([64 * 50 * 4 / 1e9] * 3) and not fast.link_limited
    assert fast.samples_per_s == pytest.approx(64 / 0.040)  # 12.8 µs per link: the stages decide
    # 64 x 50 x 4 bytes = 12.8 kB per step over 1 Mbit/s: 0.1024 s, slower than every stage
    slow = project(profiles, m=1, r=1, batch=64, link_gbps=1e-3, reader=None, buffers=2)
    assert slow.link_limited and slow.samples_per_s == pytest.approx(64 / 0.1024)
    half = project(profiles, m=1, r=1, batch=64, link_gbps=1e-3, reader=None, buffers=2, wire_bytes=2)
    assert half.samples_per_s == pytest.approx(64 / 0.0512)  # bf16 on the wire: half the bytes
    two = project(profiles, m=2, r=2, batch=64, link_gbps=1e-3, reader=None, buffers=2)
    assert two.link_s == pytest.approx([32 * 50 * 4 / 125_000])  # one boundary; each replica its shard


def test_receive_slots_are_counted_at_the_size_the_run_allocates() -> None:
    # the run sizes every slot for the largest message (slot_samples): with evaluation batches
    # of 256 and training batches of 64, 256 samples per slot, 128 per replica with R = 2
    from trgl_pipe.runtime.layout import slot_samples

    assert slot_samples(64, 256) == 256 and slot_samples(64, 256, 2) == 128 and slot_samples(64, 33, 3) == 22
    profiles = _profiles()
    one = project(profiles, m=1, r=1, batch=64, link_gbps=8.0, reader=None, buffers=2, eval_batch=256)
    assert one.peak_bytes == 3 * 1_000_000 + 4_000_000 + 2 * 256 * (100 + 50) * 4
    two = project(profiles, m=4, r=2, batch=64, link_gbps=8.0, reader=None, buffers=2, eval_batch=256)
    assert (
        two.peak_bytes == 3 * 4_000_000 + 62_500 * 32 + 2 * 128 * (100 + 50) * 4
    )  # one module's graph at a time


def test_layouts_fit_the_devices_and_the_memory_fastest_first() -> None:
    found = layouts(_profiles(), devices=4, batch=64, memory_gib=None, link_gbps=8.0, reader=None, buffers=2)
    pairs = {(lay.modules_per_rank, lay.replicas) for lay in found}
    assert pairs == {(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 3), (4, 4)}
    assert all(lay.world_size <= 4 for lay in found)
    rates = [lay.samples_per_s for lay in found]
    assert rates == sorted(rates, reverse=True)
    limit = sorted(lay.peak_bytes for lay in found)[len(found) // 2] / 2**30
    small = layouts(_profiles(), devices=4, batch=64, memory_gib=limit, link_gbps=8.0, reader=None, buffers=2)
    assert small and all(lay.peak_bytes <= limit * 2**30 for lay in small)
    assert len(small) < len(found)


def test_launch_lines_span_nodes_with_the_layout_keys() -> None:
    layout = project(_profiles(), m=1, r=4, batch=64, link_gbps=8.0, reader=None, buffers=2)
    torchrun, slurm = launch_lines("c.yaml", layout, gpus_per_node=8)
    assert "--nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d" in torchrun
    assert "pipeline.modules_per_rank=1 pipeline.replicas=4" in torchrun
    assert slurm.startswith("sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sbatch c.yaml")


def test_the_command_measures_a_config_and_prints_layouts_that_fit(capsys) -> None:
    config = str(ROOT / "configs" / "quickstart.yaml")
    small = [o for o in TINY if not o.startswith(("log.", "checkpoint."))]
    assert main([config, *small, "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "measuring 2 modules" in out and "samples/s per replica" in out
    rows = [line.split() for line in out.splitlines() if line[:3].strip().isdigit()]
    assert {(int(r[0]), int(r[1]), int(r[2])) for r in rows} == {(1, 1, 2), (2, 1, 1), (2, 2, 2)}
    assert "torchrun --nproc_per_node=2 -m trgl_pipe.run" in out


def test_bad_input_is_one_line(capsys) -> None:
    config = str(ROOT / "configs" / "quickstart.yaml")
    assert main([config, "model.num_modules=x", "--gpus", "2"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    small = [o for o in TINY if not o.startswith(("log.", "checkpoint."))]
    assert main([config, *small, "--gpus", "1", "--gpu-memory", "0.0001"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: no layout of 2 modules fits 1 devices of 0.0001 GiB") and err.count("\n") == 1
    )
