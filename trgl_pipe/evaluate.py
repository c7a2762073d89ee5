"""Measure an exported classifier's accuracy on a dataset split.

    python -m trgl_pipe.evaluate EXPORT_FOLDER [--split test|val] [section.key=value ...]

The data settings default to those of the run that was exported (export.json); overrides such as
``data.root=...`` or ``data.test_size=...`` change them. ``model.pt2`` (torch.export) is used with
``--program``; otherwise ``model.pt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from trgl_pipe.config import DataConfig, apply_override, from_dict
from trgl_pipe.data import load_data
from trgl_pipe.errors import UserError
from trgl_pipe.export import load_exported


@torch.no_grad()
def evaluate(
    folder: Path, split: str = "test", overrides: list[str] | None = None, program: bool = False
) -> dict[str, Any]:
    info = read_export_info(folder)
    raw = {"data": dict(info["data"])}
    for item in overrides or []:
        apply_override(raw, item)
    data_cfg = from_dict(DataConfig, raw["data"], "data.")
    data = load_data(data_cfg, info["seed"])
    shape = [data.channels, data.image_size, data.image_size]
    if shape != list(info["input_shape"]) or data.num_classes != info["num_classes"]:
        raise UserError(
            f"{data_cfg.name} has {data.num_classes} classes of {shape[0]}x{shape[1]}x{shape[2]} images; the "
            f"model in {folder} takes {'x'.join(map(str, info['input_shape']))} images of "
            f"{info['num_classes']} classes: evaluate it on data like that it was trained on"
        )
    images = getattr(data, split)
    if program:
        if not info.get("model_pt2"):
            raise UserError(f"{folder} has no model.pt2 ({info.get('export_error')})")
        model = _load_program(folder / "model.pt2")
    else:
        model = load_exported(folder / "model.pt")
    correct = 0
    for i in range(0, len(images), data_cfg.eval_batch_size):
        x = images.images[i : i + data_cfg.eval_batch_size].float()
        if images.images.dtype == torch.uint8:  # bytes to [0, 1]; a user's float images stay as given
            x = x / 255
        y = images.labels[i : i + data_cfg.eval_batch_size]
        correct += int((model(x).argmax(1) == y).sum())
    return {
        "module": info["module"],
        "split": split,
        "count": len(images),
        "accuracy": correct / max(1, len(images)),
    }


EXPORT_KEYS = ("module", "data", "seed", "input_shape", "num_classes")


def read_export_info(folder: Path) -> dict[str, Any]:
    """export.json, checked for what evaluation reads."""
    info_path = folder / "export.json"
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError as error:
        raise UserError(
            f"{info_path} is missing; export a run first (python -m trgl_pipe.export OUT_DIR)"
        ) from error
    except (OSError, ValueError) as error:
        raise UserError(
            f"{info_path} is unreadable ({type(error).__name__}); export the run again"
        ) from error
    missing = [k for k in EXPORT_KEYS if k not in info] if isinstance(info, dict) else list(EXPORT_KEYS)
    if missing or not isinstance(info["data"], dict):
        raise UserError(f"{info_path} lacks {', '.join(missing) or 'data'}; export the run again")
    return info


def _load_program(path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise UserError(f"{path} is missing; export the run again or drop --program")
    quiet = logging.getLogger("torch.export")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs a traceback for a damaged file before raising
    try:
        return torch.export.load(path).module()
    except Exception as error:  # torch.export.load raises many kinds on a damaged file
        raise UserError(
            f"{path} is not a readable torch.export program ({type(error).__name__}); export the run again "
            "or drop --program"
        ) from error
    finally:
        quiet.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trgl_pipe.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an export folder (OUT_DIR/export)")
    parser.add_argument("overrides", nargs="*", help="data.key=value")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--program", action="store_true", help="use model.pt2 (torch.export)")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.folder, args.split, args.overrides, args.program)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
