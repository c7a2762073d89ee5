"""summary.json: the result of a run, the same for every regime and for the pipeline.

Schema (docs/outputs.md has the full description):
    regime, transport, num_modules, world_size, epochs, laps, wall_time_s, samples_per_s,
    best_module, best_val_accuracy, best_test_accuracy, last_module_test_accuracy,
    partition, dataset, config_path, versions,
    modules: [{index, blocks, val_accuracy, test_accuracy, kinetic_energy, tau, lambda,
               num_params, num_steps, compute_s, history}],
    ranks:   [{rank, modules, device, host, samples_per_s, compute_s, recv_wait_s, send_wait_s,
               mean_buffer_occupancy, peak_memory_bytes, ...}]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from trgl_pipe.config import Config
from trgl_pipe.data import DataSplits
from trgl_pipe.errors import OutputError
from trgl_pipe.io import atomic_write_json
from trgl_pipe.partition import Partition
from trgl_pipe.watch.metrics import versions


def best_module(modules: list[dict[str, Any]]) -> int:
    """Index of the module with the highest validation accuracy (the shallowest on ties).

    Chosen on validation, never on test. Without a validation split, the last module.
    """
    scored = [(m["val_accuracy"], -m["index"]) for m in modules if m.get("val_accuracy") is not None]
    if not scored:
        return modules[-1]["index"]
    return -max(scored)[1]


def build_summary(
    cfg: Config,
    modules: list[dict[str, Any]],
    ranks: list[dict[str, Any]],
    wall_time_s: float,
    data: DataSplits,
    partition: Partition,
    transport: str,
    world_size: int,
) -> dict[str, Any]:
    modules = sorted(modules, key=lambda m: m["index"])
    best = best_module(modules)
    by_index = {m["index"]: m for m in modules}
    # samples through the network: what the first module's ranks (all replicas) trained on
    train_samples = sum(r.get("train_samples", 0) for r in ranks if modules[0]["index"] in r["modules"])
    return {
        "regime": cfg.train.regime,
        "transport": transport,
        "num_modules": len(partition),
        "world_size": world_size,
        "epochs": cfg.train.epochs,
        "laps": cfg.train.laps,
        "trgl": cfg.trgl.enabled and cfg.objective.name == "trgl",
        # what the objective says of itself (describe()), not what the config's name suggests
        "objective": modules[0].get("method"),
        "method_label": modules[0].get("label"),
        "tau_schedule": cfg.trgl.tau_schedule if cfg.trgl.enabled and cfg.objective.name == "trgl" else None,
        "wall_time_s": round(wall_time_s, 3),
        "samples_per_s": round(train_samples / wall_time_s, 2) if wall_time_s > 0 else 0.0,
        "best_module": best,
        "best_val_accuracy": by_index[best]["val_accuracy"],
        "best_test_accuracy": by_index[best]["test_accuracy"],
        "last_module_test_accuracy": modules[-1]["test_accuracy"],
        "partition": [list(r) for r in partition],
        "dataset": {
            "name": cfg.data.name,
            "origin": data.origin,
            "train": len(data.train),
            "val": len(data.val),
            "test": len(data.test),
        },
        "peak_memory_bytes": max((r.get("peak_memory_bytes", 0) for r in ranks), default=0),
        "modules": modules,
        "ranks": ranks,
        "versions": versions(),
    }


def stage_figures(ranks: list[dict[str, Any]], num_stages: int) -> list[dict[str, Any]]:
    """Per stage (its replicas together): throughput summed, times and memory of the slowest."""
    stages = []
    for s in range(num_stages):
        members = [r for r in ranks if r.get("stage") == s]
        if not members:
            continue
        stages.append(
            {
                "stage": s,
                "modules": members[0]["modules"],
                "ranks": [r["rank"] for r in members],
                "replicas": len(members),
                "train_samples": sum(r["train_samples"] for r in members),
                "samples_per_s": round(sum(r["samples_per_s"] for r in members), 2),
                "compute_s_max": max(r["compute_s"] for r in members),
                "recv_wait_s_max": max(r["recv_wait_s"] for r in members),
                "send_wait_s_max": max(r["send_wait_s"] for r in members),
                "peak_memory_bytes_max": max(r["peak_memory_bytes"] for r in members),
            }
        )
    return stages


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    path = out_dir / "summary.json"
    try:
        atomic_write_json(path, summary)
    except OSError as error:
        raise OutputError(path, error) from error
    return path


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    """The end-of-run table: one row per module, then the headline."""
    console = console or Console()
    table = Table(title=f"{summary['regime']} · K={summary['num_modules']} · {summary['transport']}")
    for header in ("module", "blocks", "val acc %", "test acc %", "τ / λ", "kinetic", "params"):
        table.add_column(header, justify="right")
    for m in summary["modules"]:
        weight = "-"
        if m.get("tau") is not None:
            weight = f"τ={m['tau']:g}"
        elif m.get("lambda") is not None:
            weight = f"λ={m['lambda']:.4g}"
        marker = " *" if m["index"] == summary["best_module"] else ""
        table.add_row(
            f"{m['index']}{marker}",
            f"{m['blocks'][0]}-{m['blocks'][1] - 1}",
            _pct(m["val_accuracy"]),
            _pct(m["test_accuracy"]),
            weight,
            "-" if m["kinetic_energy"] is None else f"{m['kinetic_energy']:.4g}",
            f"{m['num_params']:,}",
        )
    console.print(table)
    console.print(
        f"best module {summary['best_module']} (on validation): test accuracy "
        f"{_pct(summary['best_test_accuracy'])}% · wall time {summary['wall_time_s']:.1f} s · "
        f"{summary['samples_per_s']:.0f} samples/s"
    )
