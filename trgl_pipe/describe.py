"""Look before you run: every config key with its default and meaning, and what a config will build.

The key list is read from the config dataclasses themselves: each field's type and default, and
the comments written beside it (or on the lines above it) in :mod:`trgl_pipe.config`. Adding a
key there adds it here; there is no second list to keep in step.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
import tokenize
import typing
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch
import yaml

from trgl_pipe.config import DEPRECATED_OBJECTIVE_KEYS, Config, _describe_hint
from trgl_pipe.runtime.layout import Layout


@dataclasses.dataclass(frozen=True, slots=True)
class KeyDoc:
    key: str  # section.key
    kind: str  # what values it takes
    default: Any
    meaning: str


def _field_comments(cls: type) -> dict[str, str]:
    """The comments beside each field of dataclass ``cls`` and on the comment lines just above it."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    names = {f.name for f in dataclasses.fields(cls)}
    found: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0].strip()
        at_class_level = line.startswith("    ") and not line.startswith("     ")
        if ":" not in stripped or name not in names or not at_class_level:
            continue
        above = []
        row = number - 1
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, comments.get(row, ""))
            row -= 1
        # the lines above are one comment wrapped over lines: joined by spaces; the comment beside
        # the field is another, after "; "
        wrapped = " ".join(part for part in above if part)
        text = "; ".join(part for part in (wrapped, comments.get(number, "")) if part)
        found[name] = text.replace("noqa: E501", "").strip()
    return found


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def key_docs(cls: type = Config, prefix: str = "") -> list[KeyDoc]:
    """Every key of ``cls`` (sections recursively), in the order the dataclasses declare them."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    docs: list[KeyDoc] = []
    sections = []
    for f in dataclasses.fields(cls):
        if prefix == "objective." and f.name in DEPRECATED_OBJECTIVE_KEYS:
            continue  # still read for one release, with a warning naming objective.kwargs
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            sections.append((f.name, hint))
            continue
        docs.append(KeyDoc(f"{prefix}{f.name}", _describe_hint(hint), _default(f), comments.get(f.name, "")))
    for name, section in sections:
        docs.extend(key_docs(section, f"{prefix}{name}."))
    return docs


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _by_section() -> Iterator[tuple[str, str | None, KeyDoc]]:
    """Every key with its section's name, and the section's title (its docstring's first line) at
    the first key of each section (None after)."""
    section = None
    hints = typing.get_type_hints(Config)
    for doc in key_docs():
        head = doc.key.split(".")[0] if "." in doc.key else ""
        title = None
        if head != section:
            section = head
            title = (inspect.getdoc(hints.get(head)) or "").splitlines()[0] if head else "the run"
        yield head, title, doc


def keys_help() -> str:
    """The text ``--help`` shows after the arguments: every key, grouped by section."""
    out = ["config keys (section.key=value; default, then meaning):"]
    for head, title, doc in _by_section():
        if title is not None:
            out.append(f"\n  {head or '(top level)'}: {title}")
        meaning = f"  {doc.meaning}" if doc.meaning else ""
        out.append(f"    {doc.key} = {_yaml_value(doc.default)}  ({doc.kind}){meaning}")
    return "\n".join(out)


def config_reference() -> str:
    """docs/config.md: every key as a Markdown table per section, from the same source as ``--help``
    (``python -m trgl_pipe.describe > docs/config.md``; a test keeps the file equal to this)."""
    out = [
        "# Config reference",
        "",
        "Every key of a config, its default and what it does, generated from the config dataclasses",
        "(`python -m trgl_pipe.describe > docs/config.md`; a test keeps this file in step with the code).",
        "Set a key in the YAML file under its section, or on the command line as `section.key=value`",
        "(a YAML value: `train.epochs=5`, `model.split=[3,6,9]`), or in an override file named after",
        "the config (`python -m trgl_pipe.run CONFIG search.yaml`: its keys replace the config's, section",
        "by section, in the order given). `python -m trgl_pipe.run --help` prints the same list; the",
        "equations behind the keys are in [method.md](method.md).",
    ]
    for head, title, doc in _by_section():
        if title is not None:
            out += [
                "",
                f"## {head or 'top level'}",
                "",
                title,
                "",
                "| key | default | values | meaning |",
                "|---|---|---|---|",
            ]
        cells = [f"`{doc.key}`", f"`{_yaml_value(doc.default)}`", doc.kind, doc.meaning]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# What a config builds


def module_table(cfg: Config) -> tuple[list[tuple[int, int]], list[tuple[int, int]], str]:
    """The block range and the (body, head) parameter counts of every module, without any data.

    The input shape comes from the dataset's name (``data.image_size`` and ``data.channels`` for
    synthetic data and image folders); a ``balanced`` split is measured here on the CPU.
    """
    from trgl_pipe.context import resolve_partition
    from trgl_pipe.plan import data_shape
    from trgl_pipe.stage import ModuleBody, StagePlan, build_head, build_parts

    shape, classes = data_shape(cfg)
    parts = build_parts(cfg, shape, classes)
    batches = SimpleNamespace(input_shape=shape)
    partition = resolve_partition(cfg, parts, batches, classes, torch.device("cpu"))
    counts = []
    for k, (a, b) in enumerate(partition):
        plan = StagePlan(k, len(partition), a, b)
        body = ModuleBody(parts.stem if k == 0 else None, parts.blocks[a:b], a, cfg.trgl.reduction)
        head = build_head(parts, plan, classes, cfg)
        counts.append((sum(p.numel() for p in body.parameters()), sum(p.numel() for p in head.parameters())))
    where = f"input {shape[0]}x{shape[1]}x{shape[2]}, {classes} classes"
    return [tuple(r) for r in partition], counts, where


def _pipelined(cfg: Config) -> bool:
    """The config describes a torchrun pipeline: the parallel regime, or ddg and fr with replicas
    (which need ranks; without replicas they run in one process as well)."""
    delayed = cfg.train.regime in ("ddg", "fr") and cfg.pipeline.replicas > 1
    return (cfg.train.regime == "parallel" or delayed) and cfg.pipeline.transport != "sim"


def launch_line(cfg: Config, config_path: str | None, overrides: list[str], per_node: int = 8) -> str:
    """The command that starts this config: torchrun with the rank count its layout needs."""
    args = " ".join([*([config_path] if config_path else []), *overrides])
    one = f"python -m trgl_pipe.run {args}".rstrip()
    if not _pipelined(cfg):
        return one
    layout = Layout(cfg.model.num_modules, cfg.pipeline.modules_per_rank, cfg.pipeline.replicas)
    world = layout.world_size
    if world == 1:
        return one
    if world <= per_node:
        return f"torchrun --nproc_per_node={world} -m trgl_pipe.run {args}".rstrip()
    nodes = math.ceil(world / per_node)
    while world % nodes:
        nodes += 1
    return (
        f"torchrun --nnodes={nodes} --nproc_per_node={world // nodes} --rdzv-backend=c10d "
        f"--rdzv-endpoint=HEAD:29500 --rdzv-id=JOB -m trgl_pipe.run {args}"
    ).rstrip()


def describe_run(cfg: Config, config_path: str | None, overrides: list[str]) -> str:
    """The resolved config, the layout and the launch line (what ``--print-config`` prints)."""
    out = ["# resolved config", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), ""]
    partition, counts, where = module_table(cfg)
    regime = cfg.train.regime
    pipeline = _pipelined(cfg)
    layout = Layout(len(partition))
    if pipeline:
        layout = Layout(len(partition), cfg.pipeline.modules_per_rank, cfg.pipeline.replicas)
    out.append(f"# layout ({regime} regime, {cfg.model.name}, {where})")
    if pipeline and layout.world_size > 1:
        out.append(
            f"{layout.num_stages} stages x {layout.replicas} replicas = {layout.world_size} ranks, "
            f"{layout.modules_per_rank} module(s) per rank"
        )
    else:
        sim = cfg.pipeline.transport == "sim"
        out.append("one process" + (", one thread per module (sim)" if sim else ""))
    out.append(f"{'module':>6} {'blocks':>8} {'#':>3} {'body params':>12} {'head params':>12}  ranks")
    for k, ((a, b), (body, head)) in enumerate(zip(partition, counts, strict=True)):
        if pipeline and layout.world_size > 1:
            stage = k // layout.modules_per_rank
            ranks = ",".join(str(layout.rank_of(stage, r)) for r in range(layout.replicas))
        else:
            ranks = "0"
        out.append(f"{k:>6} {f'{a}-{b - 1}':>8} {b - a:>3} {body:>12,} {head:>12,}  {ranks}")
    total = sum(b + h for b, h in counts)
    out.append(f"total parameters (bodies and heads): {total:,}")
    if cfg.model.split == "balanced" and cfg.train.regime != "e2e":
        out.append("model.split=balanced: measured now on this CPU; the run measures again on its device")
    out.append("")
    out.append("# launch")
    out.append(launch_line(cfg, config_path, overrides))
    return "\n".join(out)


if __name__ == "__main__":
    print(config_reference(), end="")
