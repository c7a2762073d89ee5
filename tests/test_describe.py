"""Look before you run: --help lists every key from the dataclasses, --print-config trains nothing."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from conftest import ROOT, TINY

from trgl_pipe.config import DEPRECATED_OBJECTIVE_KEYS, Config, load_config
from trgl_pipe.context import build_context
from trgl_pipe.describe import key_docs, keys_help, launch_line, module_table
from trgl_pipe.run import main


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], f"{prefix}{f.name}."))
        elif not (prefix == "objective." and f.name in DEPRECATED_OBJECTIVE_KEYS):  # not shown: deprecated
            keys.append(f"{prefix}{f.name}")
    return keys


def test_help_lists_every_key_with_its_default_and_meaning(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    keys = _all_keys()
    assert len(keys) > 80
    for key in keys:
        assert f"    {key} = " in text, key
    # the meaning is the comment beside the field in config.py, the default its declared one
    assert "data.val_size = 5000  (an integer)  held out from the training set, picks the best module" in text
    assert "pipeline.timeout_s = 60.0  (a number)  a wait this long for a peer means the peer failed" in text
    docs = {d.key: d for d in key_docs()}
    assert docs["optim.milestones"].default == [0.5, 0.75]
    assert docs["trgl.tau"].meaning.startswith("L = CE + C / (2 tau)")  # comment lines above the field
    assert keys_help().count("\n    ") == len(keys)
    # a comment wrapped over lines reads as one sentence, not as items joined by "; "
    assert "the authors' split for this backbone and K" in docs["model.split"].meaning
    assert "forwarded K-1-k steps ago" in docs["train.delays"].meaning
    assert "(one of depth | balanced | preset or a list of integers)" in keys_help()


def test_print_config_prints_the_layout_and_trains_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    code = main([str(ROOT / "configs/quickstart.yaml"), f"out_dir={out}", "--print-config"])
    assert code == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert f"out_dir: {out}" in text  # the resolved config, overrides applied
    assert "4 stages x 1 replicas = 4 ranks, 1 module(s) per rank" in text
    rows = [line.split() for line in text.splitlines() if line[:6].strip().isdigit() and "-" in line]
    assert [r[1] for r in rows] == ["0-1", "2-3", "4-5", "6-8"]
    assert [r[-1] for r in rows] == ["0", "1", "2", "3"]
    assert text.rstrip().endswith(
        f"torchrun --nproc_per_node=4 -m trgl_pipe.run {ROOT / 'configs/quickstart.yaml'} out_dir={out}"
    )


def test_parameter_counts_are_those_of_the_built_modules(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, f"out_dir={tmp_path}", "model.num_modules=3"])
    partition, counts, _ = module_table(cfg)
    import torch

    ctx = build_context(cfg, torch.device("cpu"))
    assert partition == ctx.partition
    for k, (body, head) in enumerate(counts):
        stage = ctx.build_stage(k)
        assert (body, head) == (stage.num_body_params, stage.num_head_params)


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["train.regime=sequential"], "python -m trgl_pipe.run c.yaml train.regime=sequential"),
        (["pipeline.replicas=2"], "torchrun --nproc_per_node=8 -m trgl_pipe.run c.yaml pipeline.replicas=2"),
        (
            ["model.depth=110", "model.num_modules=16", "pipeline.replicas=2"],
            "torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HEAD:29500 "
            "--rdzv-id=JOB -m trgl_pipe.run c.yaml model.depth=110 model.num_modules=16 pipeline.replicas=2",
        ),
        (["pipeline.modules_per_rank=4"], "python -m trgl_pipe.run c.yaml pipeline.modules_per_rank=4"),
        (  # ddg and fr need ranks for replicas
            ["train.regime=ddg", "trgl.enabled=false", "pipeline.replicas=2"],
            "torchrun --nproc_per_node=8 -m trgl_pipe.run c.yaml train.regime=ddg trgl.enabled=false "
            "pipeline.replicas=2",
        ),
    ],
)
def test_launch_line_fits_the_layout(overrides: list[str], line: str) -> None:
    cfg = load_config(None, overrides)
    assert launch_line(cfg, "c.yaml", overrides) == line
