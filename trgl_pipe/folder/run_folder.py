"""The run folder: held by one run at a time, checked before anything in it changes.

A run folder is days of compute, so a run treats it as a database treats its files:

1. :func:`claim` takes an exclusive lock on ``out_dir`` (``out_dir/.lock``, holding the owner's
   host and pid) and checks that the folder may be used as the config asks, writing nothing else.
   The lock is an ``flock`` on that file: the kernel drops it when its process ends, however it
   ends, so a lock left behind by a crashed run is taken over by the next one.
2. The run checks everything else (data, split, the checkpoint against the config) with no file
   written.
3. :meth:`RunFolder.commit`: only then may the run write. With ``overwrite=true`` the earlier run
   is moved aside into ``out_dir/.replaced`` (a rename, nothing is copied or deleted) and removed
   once the new run has a complete checkpoint or has ended (:func:`discard_replaced`).

A command refused at step 1 or 2 leaves the folder as it found it (a folder it created for the
run is removed again).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from trgl_pipe.config import Config, load_config, save_config
from trgl_pipe.errors import ConfigError
from trgl_pipe.folder.checkpoint import checkpoint_root, latest_complete, read_meta
from trgl_pipe.partition import Partition
from trgl_pipe.watch.metrics import MetricsLogger, describe_argv

RUN_FILES = ("summary.json", "metrics.jsonl", "config.yaml")
LOCK = ".lock"
REPLACED = ".replaced"


def earlier_run(out: Path) -> list[str]:
    """The names of an earlier run's files in ``out`` (empty if it holds none)."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    root = checkpoint_root(out)
    if root.is_dir() and any(root.iterdir()):
        found.append("checkpoints")
    return found


def _holder(text: str) -> dict:
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    if not info:
        return "another run"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')} (since {since})"


def _alive_here(info: dict) -> bool:
    """Whether the holder named in a lock file runs on this host (another host's cannot be asked)."""
    if info.get("host") != socket.gethostname():
        return bool(info)
    try:
        os.kill(int(info.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


class RunFolder:
    """``out_dir`` held by this process: see the module docstring for the order of events."""

    def __init__(self, out: Path, fd: int, created: bool, replace: list[str]) -> None:
        self.out = out
        self._fd: int | None = fd
        self.token = _holder(os.pread(fd, 4096, 0).decode(errors="replace")).get("token", "")
        self._created = created
        self._replace = replace
        self.committed = False

    def commit(self) -> None:
        """Everything is checked: move an earlier run aside if it is being replaced."""
        if self._replace:
            aside = self.out / REPLACED
            shutil.rmtree(aside, ignore_errors=True)  # a replacement that never got going
            aside.mkdir()
            for name in self._replace:
                os.replace(self.out / name, aside / name)
            print(
                f"overwrite=true: the earlier run is kept in {aside} until this one writes a complete "
                "checkpoint or ends",
                flush=True,
            )
        self.committed = True

    def begin(
        self, cfg: Config, logger: MetricsLogger, partition: Partition, data: str, **fields: Any
    ) -> None:
        """Commit, then write the run's first files: config.yaml and the "start" event that
        every entry point logs (its own ``fields`` added)."""
        self.commit()
        save_config(cfg, self.out / "config.yaml")
        logger.log(
            "start",
            argv=describe_argv(),
            regime=cfg.train.regime,
            partition=partition,
            data=data,
            **fields,
        )

    def release(self) -> None:
        """Drop the lock; a refused run also removes the folder it created, if still empty."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.out / LOCK)
        os.close(self._fd)  # closing drops the flock
        self._fd = None
        if self._created and not self.committed:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only if empty

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _lock(out: Path) -> int:
    """Open and flock ``out/.lock``; refuse with one line naming the holder."""
    path = out / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(os.read(fd, 4096).decode(errors="replace"))
            os.close(fd)
            raise ConfigError(
                f"out_dir={out} is in use by {_describe(info)} ({path}); wait for that run to end or "
                "choose another out_dir"
            ) from None
        except OSError as error:  # a file system without flock: judge by the holder's pid
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            info = _holder(os.read(fd, 4096).decode(errors="replace"))
            if info.get("pid") != os.getpid() and _alive_here(info):
                os.close(fd)
                raise ConfigError(
                    f"out_dir={out} is in use by {_describe(info)} ({path}); wait for that run to end, "
                    f"or delete {path} if it is no longer running"
                ) from None
        # the holder may have unlinked the file between our open and our flock: lock the live one
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
    if previous and previous.get("pid") != os.getpid():
        print(f"out_dir: taking over the lock left by {_describe(previous)}, which has ended", flush=True)
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
        "argv": sys.argv,
        "token": secrets.token_hex(8),  # other ranks read it back: do they see this very folder?
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def held_by(out: Path) -> str | None:
    """Who holds ``out``'s lock right now ("pid N on host H (since T)"), or None if nobody does.

    For tools that manage many run folders (experiments/run.py): a folder another process is
    writing must be neither restarted nor removed. Takes no lock and writes nothing.
    """
    path = Path(out) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(_holder(os.read(fd, 4096).decode(errors="replace")))
    except OSError:  # a file system without flock: judge by the holder's pid
        info = _holder(os.read(fd, 4096).decode(errors="replace"))
        return _describe(info) if info.get("pid") != os.getpid() and _alive_here(info) else None
    finally:
        os.close(fd)  # closing drops a shared lock taken above
    return None


def claim(cfg: Config) -> RunFolder:
    """Lock ``out_dir`` and check it may hold this run; writes nothing but the lock file."""
    out = Path(cfg.out_dir)
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"out_dir={out} exists and is not a folder; choose another out_dir")
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        fd = _lock(out)
    except OSError as error:  # a name too long for the file system, no permission, a full disk
        raise ConfigError(
            f"out_dir={out} cannot be written ({error.strerror or error}); choose a writable out_dir"
        ) from error
    folder = RunFolder(out, fd, created, [])
    try:
        earlier = earlier_run(out)
        if earlier and cfg.resume is None and not cfg.overwrite:
            raise ConfigError(
                f"out_dir={out} already holds a run ({', '.join(earlier)}); pass resume=auto to "
                "continue it, overwrite=true to replace it, or choose another out_dir"
            )
        if (
            earlier
            and cfg.resume == "auto"
            and latest_complete(out) is None
            and not _restart_of_this_job(out)
        ):
            raise ConfigError(
                f"resume=auto: out_dir={out} holds a run ({', '.join(earlier)}) but no complete checkpoint "
                "to continue from; pass overwrite=true instead of resume to replace that run, or choose "
                "another out_dir"
            )
        if earlier and cfg.overwrite:  # config checks: overwrite=true comes without resume
            folder._replace = earlier
    except BaseException:
        folder.release()
        raise
    return folder


# keys a finished run's record may differ in without changing what it trained
_NOT_RECORDED = ("resume", "overwrite", "out_dir")


def _leaves(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def finished_already(cfg: Config) -> str | None:
    """``resume=auto`` with the very settings of a run that has ended: the line that says so, or
    None. Nothing is written then, so the finished run stays byte for byte as it was (resuming it
    used to rewrite summary.json with a wall time of 0). More epochs or steps take the usual path
    (the run continues), and so does another network (its shards are refused there, by name);
    any other change would rewrite the record of a run that trains no further: ConfigError."""
    out = Path(cfg.out_dir)
    try:
        if cfg.resume != "auto" or not (out / "summary.json").is_file():
            return None
    except OSError:  # a name the file system refuses: claim() says so in one line
        return None
    folder = latest_complete(out)
    progress = read_meta(folder)["progress"] if folder is not None else None
    if progress is None or not progress["final"]:
        return None
    try:
        recorded = _leaves(load_config(out / "config.yaml").to_dict())
    except ConfigError:
        return None  # the usual path reads the checkpoint and says what does not fit
    asked = _leaves(cfg.to_dict())
    changed = [k for k in asked if k.split(".")[0] not in _NOT_RECORDED and asked[k] != recorded.get(k)]
    step = progress["step"]
    finished = f"resume=auto: out_dir={out} holds a finished run (final checkpoint at step {step})"
    if not changed:
        return f"{finished}; nothing to do"
    if _trains_longer(asked, recorded) or any(k.startswith("model.") for k in changed):
        return None  # a longer run continues; another network is refused where its shards are read
    shown = ", ".join(f"{k}={asked[k]} (it ran with {recorded.get(k)})" for k in changed[:3])
    raise ConfigError(
        f"{finished}; {shown}{' and more' if len(changed) > 3 else ''} would change its record without "
        "training a step: raise train.epochs to train on with them, or choose another out_dir"
    )


def _trains_longer(asked: dict[str, Any], recorded: dict[str, Any]) -> bool:
    """Whether the settings asked for train past the recorded run's end (more epochs or steps)."""
    epochs = asked["train.epochs"] > (recorded.get("train.epochs") or 0)
    limit, before = asked.get("train.max_steps"), recorded.get("train.max_steps")
    steps = before is not None and (limit is None or limit > before)
    return epochs or steps


def _restart_of_this_job(out: Path) -> bool:
    """torchrun --max-restarts restarting a job that died before its first checkpoint: what is in
    ``out`` is that job's own start, not a run to keep."""
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0")
    return restarted and not (out / "summary.json").exists()


def discard_replaced(out: str | Path) -> None:
    """The new run has a complete checkpoint or has ended: the run it replaced may go."""
    shutil.rmtree(Path(out) / REPLACED, ignore_errors=True)


def lock_token(out: Path) -> str | None:
    """The token in ``out``'s lock record as this process sees the file (None: no lock there).

    Rank 0 locks out_dir; every other rank reads the token back to check that it sees the same
    folder, which on several nodes means one shared file system."""
    try:
        text = (Path(out) / LOCK).read_text(errors="replace")
    except OSError:
        return None
    return _holder(text).get("token")
