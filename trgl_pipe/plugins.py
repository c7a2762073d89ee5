"""User code named in the config by an import path ``pkg.mod:callable``, or handed to
:func:`trgl_pipe.train` as a Python object.

Every rank imports the path itself, so the module must be importable on every rank (installed,
or on ``PYTHONPATH``). Objects given to :func:`trgl_pipe.train` are registered here under their
``module:qualname`` so the config still names them and each rank of a torchrun script finds its
own copy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from trgl_pipe.errors import ConfigError

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
    """Call user code; a TypeError from the call itself (wrong arguments) gets one line."""
    try:
        return fn(**kwargs)
    except TypeError as error:
        if error.__traceback__ is not None and error.__traceback__.tb_next is None:
            raise ConfigError(f"{key}={path}: cannot call it with ({', '.join(kwargs)}): {error}") from error
        raise
