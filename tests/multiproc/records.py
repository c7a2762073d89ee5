"""What a run folder records, read back for comparing a pipeline with its one-process reference."""

from __future__ import annotations

from pathlib import Path

import torch

from trgl_pipe.watch.metrics import read_metrics


def step_losses(out: Path, by_replica: bool = False) -> dict[tuple[int, ...], tuple[float, float, float]]:
    """(module, step[, replica]) -> (loss, ce, kinetic) for every training step of the run in ``out``."""
    return {
        (e["module"], e["step"], *((e.get("replica", 0),) if by_replica else ())): (
            e["loss"],
            e["ce"],
            e["kinetic"],
        )
        for e in read_metrics(out / "metrics.jsonl")
        if e["event"] == "train"
    }


def final_shards(out: Path, k: int) -> list[dict]:
    """The stage state of each of the ``k`` modules in the newest complete checkpoint."""
    folder = sorted(p for p in (out / "checkpoints").iterdir() if (p / "meta.json").is_file())[-1]
    return [torch.load(folder / f"module-{i}.pt", weights_only=True)["stage"] for i in range(k)]


def assert_equal_shards(a: Path, b: Path, k: int, parts: tuple[str, ...] = ("body", "head")) -> None:
    """Every tensor of ``parts`` of every module's final shard equal bit for bit between two runs."""
    for sa, sb in zip(final_shards(a, k), final_shards(b, k), strict=True):
        for part in parts:
            if part not in sa:
                continue
            assert sa[part].keys() == sb[part].keys(), part
            for name, tensor in sa[part].items():
                assert torch.equal(tensor, sb[part][name]), (part, name)
