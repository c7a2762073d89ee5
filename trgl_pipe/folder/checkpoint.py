"""Checkpoints: one shard per module, plus ``meta.json`` written last.

Layout: ``OUT_DIR/checkpoints/<progress:010d>/module-<k>.pt`` and ``meta.json``. A checkpoint is
complete exactly when ``meta.json`` exists; every file is written atomically (temporary file,
flush, fsync, rename). In the pipeline, the rank of module k writes its shard when the CHECKPOINT
marker reaches it, *before* passing the marker on; so when the marker reaches the last module
every other shard is on disk, and the last module writes ``meta.json``. No rank waits for another.
With data-parallel replicas, replica 0 of each stage writes (the replicas hold the same weights).

A complete checkpoint is never removed before its successor is complete: if a complete one
already holds the counter being written (a run resumed from an earlier checkpoint reaches it
again), the new shards go to ``<counter>.next`` and replace it only once that is complete.

Shards hold only tensors and plain containers and are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trgl_pipe.config import Config
from trgl_pipe.errors import CheckpointError
from trgl_pipe.io import atomic_write, atomic_write_json
from trgl_pipe.partition import Partition
from trgl_pipe.watch.metrics import versions

FORMAT = 1
META = "meta.json"
META_KEYS = ("num_modules", "partition", "arch", "regime", "data", "progress")  # what resuming reads


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def shard_name(index: int) -> str:
    return f"module-{index}.pt"


@dataclass(frozen=True, slots=True)
class Progress:
    """Where training stands at a checkpoint.

    ``counter`` orders checkpoints of one run (the parallel regime: training steps done; the
    sequential regimes: finished module-epochs). ``epoch``/``batch``/``step`` locate the next
    batch of the parallel regime; ``phase`` is the next (lap, module, epoch) of the sequential ones.
    """

    counter: int
    epoch: int = 0
    batch: int = 0
    step: int = 0
    phase: int = 0
    final: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "counter": self.counter,
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "phase": self.phase,
            "final": self.final,
        }


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # a different number of GPUs
            torch.cuda.set_rng_state_all(state["cuda"])


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def write_shard(folder: Path, index: int, state: dict[str, Any]) -> Path:
    """Write one module's state atomically into ``folder``."""
    payload = {"format": FORMAT, "rng": _rng_state(), **_to_cpu(state)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = folder / shard_name(index)
    atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))
    return path


def arch_identity(cfg: Config) -> dict[str, Any]:
    """The model keys that decide the shapes of the weights (what a shard must match)."""
    m = cfg.model
    if m.arch == "cifar_resnet":
        return {"arch": m.arch, "depth": m.depth, "width": m.width, "block": m.block, "shortcut": m.shortcut}
    identity: dict[str, Any] = {"arch": m.arch}
    if m.arch.startswith("swin"):
        identity.update(patch_size=m.patch_size, window_size=m.window_size)
    if m.arch.startswith("resnet"):
        identity["small_input"] = m.small_input
    return identity


def meta_for(
    cfg: Config,
    partition: Partition,
    progress: Progress,
    regime: str,
    model_info: dict | None = None,
    steps_per_epoch: int | None = None,
) -> dict[str, Any]:
    return {
        "model": model_info or {},
        "steps_per_epoch": steps_per_epoch,
        "layout": {
            "modules_per_rank": cfg.pipeline.modules_per_rank,
            "replicas": cfg.pipeline.replicas,
        },
        "format": FORMAT,
        "regime": regime,
        "num_modules": len(partition),
        "partition": [list(r) for r in partition],
        "arch": arch_identity(cfg),
        "data": {"name": cfg.data.name, "batch_size": cfg.data.batch_size, "seed": cfg.seed},
        "shards": [shard_name(k) for k in range(len(partition))],
        "progress": progress.as_dict(),
        "time": time.time(),
        "versions": versions(),
        "config": cfg.to_dict(),
    }


def write_meta(folder: Path, meta: dict[str, Any], keep: int) -> None:
    """Mark ``folder`` complete (after checking every shard is there) and prune old checkpoints."""
    missing = [s for s in meta["shards"] if not (folder / s).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} lacks {', '.join(missing)}; it is not complete")
    atomic_write_json(folder / META, meta)
    prune(folder.parent, keep)


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and stale partial ones."""
    complete = _complete_folders(root)
    if not complete:
        return
    counters = sorted({_counter(p) for p in complete})  # a counter being replaced counts once
    newest, oldest_kept = counters[-1], counters[-min(keep, len(counters))]
    for old in complete:
        if _counter(old) < oldest_kept:
            shutil.rmtree(old, ignore_errors=True)
    for partial in root.iterdir():
        counter = partial.name.partition(".")[0]
        stale = counter.isdigit() and int(counter) < newest
        if partial.is_dir() and not (partial / META).is_file() and stale:
            shutil.rmtree(partial, ignore_errors=True)


def _counter(folder: Path) -> int:
    return int(folder.name.partition(".")[0])


def _replace(folder: Path, successor: Path) -> None:
    """Put the complete ``successor`` in place of the complete ``folder`` (never neither)."""
    retired = folder.with_name(folder.name + ".old")
    shutil.rmtree(retired, ignore_errors=True)
    folder.rename(retired)  # from here until the next rename, ``successor`` is the complete one
    successor.rename(folder)
    shutil.rmtree(retired, ignore_errors=True)


def folder_for(out_dir: str | Path, progress: Progress) -> Path:
    return checkpoint_root(out_dir) / f"{progress.counter:010d}"


# ---------------------------------------------------------------------------------------------
# Finding and loading


def _complete_folders(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``<counter>.next`` after ``<counter>`` on a tie)."""
    found = []
    for p in root.iterdir():
        counter, _, suffix = p.name.partition(".")
        if p.is_dir() and counter.isdigit() and suffix in ("", "next") and (p / META).is_file():
            found.append((int(counter), suffix == "next", p))
    return [p for *_, p in sorted(found)]


def latest_complete(out_dir: str | Path) -> Path | None:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    complete = _complete_folders(root)
    return complete[-1] if complete else None


def resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint folder ``resume`` points at; None to start fresh (resume=auto, none yet)."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        return latest_complete(cfg.out_dir)
    path = Path(cfg.resume)
    if (path / META).is_file():
        return path
    if path.is_dir():
        found = latest_complete(path)
        if found is not None:
            return found
        if checkpoint_root(path).is_dir() or any(path.glob(shard_name(0))):
            raise CheckpointError(f"resume={path}: no complete checkpoint there (no {META})")
    raise CheckpointError(f"resume={path}: not a checkpoint folder (no {META}) or a run folder with one")


def read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / META).read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {folder} is incomplete: {META} is missing") from error
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {folder}: {META} is unreadable ({error})") from error
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {folder}: {META} holds a {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {folder} has format {meta.get('format')}, expected {FORMAT}")
    missing = [key for key in META_KEYS if key not in meta]
    progress = meta.get("progress")
    if not missing and isinstance(progress, dict):
        missing = [f"progress.{key}" for key in Progress.__slots__ if key not in progress]
    elif not missing:
        missing = ["progress"]
    if missing or not isinstance(meta["data"], dict):
        lacks = ", ".join(missing) or "data"
        raise CheckpointError(f"checkpoint {folder}: {META} lacks {lacks}; resume from another checkpoint")
    return meta


def check_compatible(
    meta: dict[str, Any],
    cfg: Config,
    partition: Partition,
    regime: str,
    folder: Path,
    steps_per_epoch: int | None = None,
) -> None:
    """Refuse a checkpoint that was made for another network, split or regime."""
    arch = arch_identity(cfg)
    problems = []
    if meta["num_modules"] != len(partition):
        problems.append(f"it has {meta['num_modules']} modules, the config {len(partition)}")
    elif [list(r) for r in partition] != meta["partition"]:
        problems.append(f"its split is {meta['partition']}, the config's {[list(r) for r in partition]}")
    if meta["arch"] != arch:
        problems.append(f"its model is {meta['arch']}, the config's {arch}")
    if meta["regime"] != regime:
        problems.append(f"it was made by regime {meta['regime']}, the config says {regime}")
    if steps_per_epoch is not None and meta.get("steps_per_epoch") not in (None, steps_per_epoch):
        problems.append(
            f"it has {meta['steps_per_epoch']} batches per epoch, this run {steps_per_epoch} (a last "
            "partial batch smaller than pipeline.replicas is dropped; keep the number of replicas)"
        )
    if meta["data"].get("batch_size") != cfg.data.batch_size:
        problems.append(
            f"its data.batch_size is {meta['data'].get('batch_size')}, the config's {cfg.data.batch_size}"
        )
    if problems:
        raise CheckpointError(f"checkpoint {folder} does not match the config: {'; '.join(problems)}")


def load_shard(folder: Path, index: int, restore_rng: bool = True) -> dict[str, Any]:
    """One module's state, read without running any code from the file."""
    path = folder / shard_name(index)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {folder} is incomplete: {path.name} is missing") from error
    except Exception as error:
        raise CheckpointError(
            f"checkpoint shard {path} is corrupt ({type(error).__name__}); resume from an earlier checkpoint"
        ) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint shard {path} is not a trgl_pipe shard")
    if restore_rng:
        _set_rng_state(state["rng"])
    return state


# ---------------------------------------------------------------------------------------------
# Writing from the message stream


class CheckpointWriter:
    """The workers' checkpoint hook: write this module's shard; the last module writes meta.json."""

    def __init__(
        self,
        cfg: Config,
        partition: Partition,
        regime: str,
        model_info: dict | None = None,
        steps_per_epoch: int | None = None,
        on_complete: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.partition = partition
        self.regime = regime
        self.model_info = model_info
        self.steps_per_epoch = steps_per_epoch
        self.on_complete = on_complete  # called after each complete checkpoint

    def __call__(self, worker: Any, msg: Any) -> None:
        progress = Progress(
            counter=msg.step, epoch=msg.epoch, batch=msg.batch, step=msg.step, final=msg.final
        )
        self.write(progress, [worker])

    def write(self, progress: Progress, workers: list[Any]) -> Path:
        """Write the shards of ``workers``; if the last module is among them, complete the checkpoint."""
        folder = folder_for(self.cfg.out_dir, progress)
        # a complete checkpoint already holds this counter: write beside it, swap when complete
        target = folder.with_name(folder.name + ".next") if (folder / META).is_file() else folder
        try:
            for worker in workers:
                write_shard(target, worker.index, worker.state_dict())
            if any(w.index == len(self.partition) - 1 for w in workers):
                meta = meta_for(
                    self.cfg, self.partition, progress, self.regime, self.model_info, self.steps_per_epoch
                )
                write_meta(target, meta, self.cfg.checkpoint.keep)
                if target != folder:
                    _replace(folder, target)
                if self.on_complete is not None:
                    self.on_complete()
        except OSError as error:
            raise CheckpointError(
                f"cannot write checkpoint {target} ({error.strerror or error}); earlier checkpoints are "
                "intact: free space or fix the folder, then continue with resume=auto"
            ) from error
        return folder


def find_resume(
    cfg: Config, partition: Partition, regime: str, steps_per_epoch: int | None = None
) -> Path | None:
    """The checkpoint ``resume`` names, checked against this run; None to start fresh.

    The number of replicas and modules per rank may differ from the run that wrote it (shards are
    per module), as long as the number of batches per epoch is the same.
    """
    folder = resolve_resume(cfg)
    if folder is None:
        if cfg.resume == "auto":
            print("resume=auto: no complete checkpoint yet, starting from scratch", flush=True)
        return None
    check_compatible(read_meta(folder), cfg, partition, regime, folder, steps_per_epoch)
    return folder


def restore_workers(folder: Path, workers: list[Any], logger: Any = None, announce: bool = True) -> Progress:
    """Load each worker's shard from ``folder``; returns where training continues.

    Writes nothing: ``logger`` (if given) gets the ``resume`` event, which callers that must check
    everything before writing log later with :func:`log_resume`.
    """
    meta = read_meta(folder)
    for worker in workers:
        state = load_shard(folder, worker.index)
        try:
            worker.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(
                f"checkpoint shard {folder / shard_name(worker.index)} does not fit module {worker.index} of "
                f"this config ({type(error).__name__}: {reason[:200]}); resume with the settings that "
                "wrote it, or start a new out_dir"
            ) from error
    p = meta["progress"]
    progress = Progress(p["counter"], p["epoch"], p["batch"], p["step"], p["phase"], p["final"])
    if logger is not None:
        log_resume(logger, folder, workers, progress)
    if announce:
        print(f"resumed from {folder} ({progress.as_dict()})", flush=True)
    return progress


def log_resume(logger: Any, folder: Path, workers: list[Any], progress: Progress) -> None:
    logger.log("resume", checkpoint=str(folder), modules=[w.index for w in workers], **progress.as_dict())
