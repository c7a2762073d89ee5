"""Where the series go: TensorBoard event files and a Weights & Biases run.

Both are optional installs (``pip install -e ".[tensorboard]"``, ``".[wandb]"``); asking for one
that is not installed is a one-line error before any work starts.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Any, Protocol

from trgl_pipe.config import Config
from trgl_pipe.errors import ConfigError
from trgl_pipe.watch.series import Point

WANDB_ID_FILE = "wandb_run_id"


class Sink(Protocol):
    def scalars(self, points: list[Point]) -> None: ...

    def hparams(self, config: dict[str, Any], results: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train.epochs": 10, ...}``: scalars as they are, lists and nulls as text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class TensorBoardSink:
    """Event files under ``out_dir/tensorboard``; the config and final accuracies as hparams."""

    def __init__(self, log_dir: Path, fresh: bool) -> None:
        """``fresh``: a new run (not a resumed one) replaces event files an earlier run left."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ConfigError(
                "log.tensorboard=true needs the tensorboard package: pip install -e '.[tensorboard]' "
                "(or pip install tensorboard), or set log.tensorboard=false"
            ) from error
        self.log_dir = log_dir
        if fresh and log_dir.is_dir():
            shutil.rmtree(log_dir)
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, points: list[Point]) -> None:
        for point in points:
            self._writer.add_scalar(point.tag, point.value, point.step)

    def hparams(self, config: dict[str, Any], results: dict[str, Any]) -> None:
        metrics = {f"hparam/{k}": float(v) for k, v in results.items() if v is not None}
        self._writer.add_hparams(flat_config(config), metrics, run_name=".")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """One W&B run per out_dir: its id is kept beside the run, so ``resume=auto`` continues it.

    Each module and each rank has its own step axis (``module_<k>/step``), as its series are
    keyed by the module's global step and the modules of a pipeline run advance at their own pace.
    """

    def __init__(self, cfg: Config) -> None:
        try:
            import wandb
        except ImportError as error:
            raise ConfigError(
                "log.wandb.mode needs the wandb package: pip install -e '.[wandb]' (or pip install wandb), "
                "or set log.wandb.mode=disabled"
            ) from error
        self._wandb = wandb
        out = Path(cfg.out_dir)
        id_file = out / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if cfg.resume is not None and id_file.is_file() else None
        if run_id is None:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
        w = cfg.log.wandb
        self._run = wandb.init(
            project=w.project,
            entity=w.entity,
            name=w.name or out.name,
            group=w.group,
            tags=w.tags or None,
            mode=w.mode,
            dir=str(out),
            id=run_id,
            resume="allow",
            config=cfg.to_dict(),
            settings=wandb.Settings(console="off", silent=True),
        )
        self._axes: set[str] = set()

    def scalars(self, points: list[Point]) -> None:
        rows: dict[tuple[str, int], dict[str, float]] = {}
        for point in points:
            axis = point.tag.split("/", 1)[0]
            if axis not in self._axes:
                self._axes.add(axis)
                self._run.define_metric(f"{axis}/step", hidden=True)
                self._run.define_metric(f"{axis}/*", step_metric=f"{axis}/step")
            rows.setdefault((axis, point.step), {f"{axis}/step": point.step})[point.tag] = point.value
        for row in rows.values():
            self._run.log(row)

    def hparams(self, config: dict[str, Any], results: dict[str, Any]) -> None:
        self._run.summary.update({f"final/{k}": v for k, v in results.items()})

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._run.finish()


def check_packages(cfg: Config) -> None:
    """Before any work: the packages the asked-for sinks need are installed (one-line error)."""
    import importlib.util

    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "log.tensorboard=true needs the tensorboard package: pip install -e '.[tensorboard]' "
            "(or pip install tensorboard), or set log.tensorboard=false"
        )
    if cfg.log.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"log.wandb.mode={cfg.log.wandb.mode} needs the wandb package: pip install -e '.[wandb]' "
            "(or pip install wandb), or set log.wandb.mode=disabled"
        )


def open_sinks(cfg: Config) -> list[Sink]:
    """The sinks the config asks for (``log.tensorboard``, ``log.wandb.mode``)."""
    sinks: list[Sink] = []
    if cfg.log.tensorboard:
        sinks.append(TensorBoardSink(Path(cfg.out_dir) / "tensorboard", fresh=cfg.resume is None))
    if cfg.log.wandb.mode != "disabled":
        sinks.append(WandbSink(cfg))
    return sinks
