"""What a search decides, and the files it leaves: ``search.yaml`` (an override file a run and the
planner take) and ``search.json`` beside it (the scores, the options, the cost)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from trgl_pipe.errors import ConfigError
from trgl_pipe.io import atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class Decision:
    """The K − 1 cuts (``split``: the blocks where modules 2..K start) and each module's head depth."""

    split: list[int]
    depths: list[int]
    cut_scores: list[float]  # a_cut of every gap (after block i)
    depth_weights: list[list[float]]  # softmax(β) of every gap over depths 1..D


def decide(alpha: Tensor, beta: Tensor, num_modules: int, last_depth: int = 1) -> Decision:
    """The K − 1 gaps with the highest a_cut (ties: the earlier gap), and at each the depth of the
    highest weight; the last module's entry is ``last_depth`` (its head is not searched)."""
    cut = torch.softmax(alpha.double(), dim=1)[:, 0]
    mix = torch.softmax(beta.double(), dim=1)
    if not 1 <= num_modules <= len(cut) + 1:
        raise ConfigError(
            f"model.num_modules={num_modules}: the searched network has {len(cut) + 1} blocks; "
            f"choose 1 to {len(cut) + 1} modules"
        )
    order = sorted(range(len(cut)), key=lambda i: (-float(cut[i]), i))
    gaps = sorted(order[: num_modules - 1])
    depths = [int(mix[i].argmax()) + 1 for i in gaps] + [last_depth]
    return Decision([i + 1 for i in gaps], depths, cut.tolist(), mix.tolist())


def override_text(decision: Decision, num_modules: int, header: list[str]) -> str:
    """search.yaml: the decision as config keys, the scores as comments above them."""
    lines = [f"# {line}" for line in header]
    lines.append("# gap after block: cut weight | head depth weights 1..D (* = chosen cut)")
    chosen = {s - 1 for s in decision.split}
    for i, (score, weights) in enumerate(zip(decision.cut_scores, decision.depth_weights, strict=True)):
        mark = "*" if i in chosen else " "
        lines.append(f"# {mark}{i:>3}: {score:.4f} | {' '.join(f'{w:.3f}' for w in weights)}")
    body = {
        "model": {"num_modules": num_modules, "split": decision.split},
        "aux": {"type": "sedona", "depth": decision.depths},
    }
    keys = yaml.safe_dump(body, default_flow_style=None, sort_keys=False)
    note = "# the last module's depth applies only where it has an auxiliary head (aux.last=aux)\n"
    return "\n".join(lines) + "\n" + keys + note


def write_result(out: Path, decision: Decision, num_modules: int, header: list[str], record: dict) -> None:
    """Write search.json first, then search.yaml (its presence says the search finished)."""
    atomic_write_json(out.with_suffix(".json"), {**record, "decision": decision.__dict__})
    atomic_write_text(out, override_text(decision, num_modules, header))


def read_split(path: str | Path) -> dict[str, Any]:
    """The ``model`` and ``aux`` keys of a search.yaml (for the planner), with one-line errors."""
    from trgl_pipe.config import read_yaml_mapping

    path = Path(path)
    raw = read_yaml_mapping(path)
    split = raw.get("model", {}).get("split") if isinstance(raw.get("model"), dict) else None
    if not isinstance(split, list):
        raise ConfigError(
            f"{path} holds no model.split list; is it a search.yaml of python -m trgl_pipe.search?"
        )
    return raw


def read_record(path: str | Path) -> dict[str, Any]:
    """search.json beside a search.yaml."""
    path = Path(path)
    try:
        return json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path.with_suffix('.json')}: not readable ({error})") from error
