"""Export G_k followed by F_k as a standalone classifier.

    python -m trgl_pipe.export OUT_DIR [--module K] [--checkpoint PATH] [--to FOLDER]

writes ``FOLDER/model.pt`` (weights + the builder's arguments, read with weights_only=True and
rebuilt by :func:`load_exported`) and ``FOLDER/model.pt2`` (a ``torch.export`` program that loads
with ``torch.export.load(path).module()``, without this package). Both take float images in
[0, 1] of shape [N, C, H, W] (a user dataset of float images: in its own units; the training
normalisation is inside) and return logits. By default
the module is the best one on validation (summary.json) and the weights come from the final
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trgl_pipe.config import Config, from_dict
from trgl_pipe.errors import CheckpointError, OutputError, UserError
from trgl_pipe.folder.checkpoint import latest_complete, load_shard, read_meta
from trgl_pipe.io import atomic_write, atomic_write_json
from trgl_pipe.stage import ModuleBody, StagePlan, build_parts, module_head

FORMAT = 2  # 2: the model is rebuilt from the run's config (every backbone)


class ExportedClassifier(nn.Module):
    """normalise → stem and blocks of modules 0..k → F_k."""

    def __init__(
        self, bodies: list[ModuleBody], head: nn.Module, mean: list[float], std: list[float]
    ) -> None:
        super().__init__()
        self.bodies = nn.ModuleList(bodies)
        self.head = head
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.mean) / self.std
        for body in self.bodies:
            x, _ = body(x, kinetic_grad=False)
        return self.head(x)


def build_exported(spec: dict[str, Any]) -> ExportedClassifier:
    """Rebuild the classifier described by ``spec`` (its weights come next, from a state_dict)."""
    raw = dict(spec["config"])
    raw["model"] = {**raw["model"], "init_from": None}  # the weights come from the checkpoint
    cfg = from_dict(Config, raw, "")
    input_shape = tuple(spec["input_shape"])
    backbone = build_parts(cfg, input_shape, spec["num_classes"])
    partition = spec["partition"]
    bodies = [
        ModuleBody(backbone.stem if i == 0 else None, backbone.blocks[a:b], a)
        for i, (a, b) in enumerate(partition)
    ]
    a, b = partition[-1]
    plan = StagePlan(spec["module"], spec["num_modules"], a, b)
    head = module_head(backbone, plan, spec["num_classes"], cfg)
    model = ExportedClassifier(bodies, head, spec["mean"], spec["std"])
    return model.eval()


def load_exported(path: str | Path) -> ExportedClassifier:
    """Load ``model.pt`` written by :func:`export` (no code is run from the file)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise UserError(f"{path}: no such exported model; run python -m trgl_pipe.export first") from error
    except Exception as error:
        raise UserError(f"{path}: not a readable exported model ({type(error).__name__})") from error
    if not isinstance(payload, dict) or "spec" not in payload:
        raise UserError(f"{path}: not a trgl_pipe exported model")
    if payload.get("format") != FORMAT:
        raise UserError(
            f"{path}: exported by another trgl_pipe version (format {payload.get('format')}); export it again"
        )
    model = build_exported(payload["spec"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def _final_checkpoint(out_dir: Path) -> Path:
    folder = latest_complete(out_dir)
    if folder is None:
        raise CheckpointError(f"{out_dir} holds no complete checkpoint to export")
    return folder


def export(
    out_dir: Path, module: int | None = None, checkpoint: Path | None = None, to: Path | None = None
) -> dict[str, Any]:
    """Write model.pt (and model.pt2) for module ``module``; returns the export's description."""
    to = to or out_dir / "export"
    if to.exists() and not to.is_dir():
        raise UserError(f"--to {to} is a file; name a folder for model.pt and model.pt2")
    folder = checkpoint or _final_checkpoint(out_dir)
    meta = read_meta(folder)
    summary_path = out_dir / "summary.json"
    if module is None:
        module = _best_module(summary_path)
    k = meta["num_modules"]
    if not 0 <= module < k:
        raise UserError(f"--module {module} is out of range: this run has modules 0..{k - 1}")
    model_info = meta.get("model") or {}
    if not model_info.get("normalization"):
        raise CheckpointError(f"checkpoint {folder} predates exports (no model description in meta.json)")
    cfg = meta["config"]
    spec = {
        "config": cfg,
        "input_shape": model_info["input_shape"],
        "num_classes": model_info["num_classes"],
        "partition": meta["partition"][: module + 1],
        "module": module,
        "num_modules": k,
        "mean": model_info["normalization"]["mean"],
        "std": model_info["normalization"]["std"],
    }
    model = build_exported(spec)
    for i, body in enumerate(model.bodies):
        body.load_state_dict(load_shard(folder, i, restore_rng=False)["stage"]["body"])
    model.head.load_state_dict(load_shard(folder, module, restore_rng=False)["stage"]["head"])
    model.eval()
    payload = {"format": FORMAT, "spec": spec, "state_dict": model.state_dict()}
    try:
        atomic_write(to / "model.pt", lambda handle: torch.save(payload, handle))
    except OSError as error:
        raise OutputError(to / "model.pt", error) from error
    info = {
        "module": module,
        "checkpoint": str(folder),
        "input_shape": model_info["input_shape"],
        "num_classes": model_info["num_classes"],
        "model_pt": str(to / "model.pt"),
        "data": cfg["data"],
        "seed": cfg["seed"],
    }
    example = torch.rand(2, *model_info["input_shape"])
    try:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
        atomic_write(to / "model.pt2", lambda handle: torch.export.save(program, handle))
        info["model_pt2"] = str(to / "model.pt2")
    except Exception as error:  # torch.export is best effort; model.pt always works
        info["model_pt2"] = None
        info["export_error"] = f"{type(error).__name__}: {error}"[:300]
    try:
        atomic_write_json(to / "export.json", info)
    except OSError as error:
        raise OutputError(to / "export.json", error) from error
    return info


def _best_module(summary_path: Path) -> int:
    """The module summary.json names best on validation."""
    if not summary_path.is_file():
        raise UserError(f"{summary_path} is missing: pass --module to choose the module to export")
    try:
        summary = json.loads(summary_path.read_text())
        return int(summary["best_module"])
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"{summary_path} does not name a best_module ({type(error).__name__}); pass --module"
        ) from error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trgl_pipe.export", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="a run's out_dir")
    parser.add_argument("--module", type=int, default=None, help="module index (default: best on validation)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: newest)")
    parser.add_argument("--to", type=Path, default=None, help="output folder (default: OUT_DIR/export)")
    args = parser.parse_args(argv)
    try:
        info = export(args.out_dir, args.module, args.checkpoint, args.to)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(
        f"exported module {info['module']} from {info['checkpoint']} to {info['model_pt']}"
        + (
            f" and {info['model_pt2']}"
            if info["model_pt2"]
            else f" (torch.export failed: {info['export_error']})"
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
