"""User code named in the config by an import path ``pkg.mod:callable``, or handed to
:func:`trgl_pipe.train` as a Python object.

Every rank imports the path itself, so the module must be importable on every rank (installed,
or on ``PYTHONPATH``). Objects given to :func:`trgl_pipe.train` are registered here under their
``module:qualname`` so the config still names them and each rank of a torchrun script finds its
own copy.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable
from typing import Any

from trgl_pipe.errors import ConfigError, UserCodeError, UserError

_REGISTERED: dict[str, Callable[..., Any]] = {}


def register_object(obj: Callable[..., Any]) -> str:
    """Register a callable of this process and return the import path the config will hold."""
    if not callable(obj):
        raise ConfigError(f"expected a callable (a function or class), got {type(obj).__name__}")
    module = getattr(obj, "__module__", None) or "__main__"
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    path = f"{module}:{name.replace('<', '').replace('>', '')}"
    _REGISTERED[path] = obj
    return path


def load_callable(key: str, path: str) -> Callable[..., Any]:
    """The object ``path`` names (``pkg.mod:attr`` or ``pkg.mod:Class.attr``), with one-line errors
    that name the config key, the module and the import error."""
    if path in _REGISTERED:
        return _REGISTERED[path]
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module may fail in any way while it runs
        raise ConfigError(
            f"{key}={path}: cannot import module {module_name} ({type(error).__name__}: {error}); "
            "is it installed or on PYTHONPATH on every rank?"
        ) from error
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}={path}: module {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}={path}: {attr} is a {type(obj).__name__}, not a callable")
    return obj


def call_user(key: str, path: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call user code. A TypeError from the call itself (wrong arguments) is a one-line config
    error; any exception raised inside the user's code becomes a :class:`UserCodeError` that keeps
    the user's frames (and those of what it called), not trgl_pipe's."""
    try:
        return fn(**kwargs)
    except UserError:
        raise  # trgl_pipe's own one-line error, raised through the user's code
    except Exception as error:
        inside = error.__traceback__.tb_next if error.__traceback__ is not None else None
        if inside is None and isinstance(error, TypeError):
            raise ConfigError(f"{key}={path}: cannot call it with ({', '.join(kwargs)}): {error}") from error
        frames = "".join(traceback.format_tb(inside)) if inside is not None else ""
        frames += "".join(traceback.format_exception_only(error))
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UserCodeError(
            f"{key}={path} raised {type(error).__name__}{': ' + text if text else ''}",
            f"Traceback of {path} (most recent call last):\n{frames}",
        ) from error
