"""The pipeline runtime: how module-wise training runs across workers without locking.

Data flows one way: the message stream (``schedule``) → each worker applies messages to its
modules (``worker``) in the same loop everywhere (``loop``) → bounded buffers (``buffer``) and
links (``transport``) carry the detached outputs on. ``layout`` says which rank holds which
modules (stages × replicas), ``mesh`` creates the process groups, ``replicas`` makes a stage
data-parallel, ``clock`` times compute and waits, ``rank`` is the program of one torchrun rank,
``sim`` runs the same loop in threads of one process, ``preemption`` turns SIGTERM into a
checkpoint and a clean stop.

Ways in: :func:`run_rank` (under torchrun) and :func:`run_simulated` (one process).
"""

from __future__ import annotations

from typing import Any

from trgl_pipe.runtime.layout import Layout
from trgl_pipe.runtime.messages import Kind, Message

__all__ = ["Kind", "Layout", "Message", "run_rank", "run_simulated"]


def __getattr__(name: str) -> Any:
    # The two programs import the whole trainer (context, data, checkpoints), which itself uses
    # the runtime's messages and schedule: loading them on first use keeps the imports acyclic.
    if name == "run_rank":
        from trgl_pipe.runtime.rank import run_rank

        return run_rank
    if name == "run_simulated":
        from trgl_pipe.runtime.sim import run_simulated

        return run_simulated
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
