"""The pipeline runtime: the protocol between workers and the links that carry it, nothing above.

``messages`` is what flows (batches, epoch ends, checkpoints, stop), ``schedule`` the stream of
messages the first module reads, ``buffer`` the bounded queues and their timed waits,
``transport`` the in-process and torch.distributed links, ``layout`` which rank holds which
modules (stages × replicas), ``mesh`` the process groups and failure records, ``clock`` the
compute and wait timing, ``preemption`` SIGTERM turned into a checkpoint and a clean stop.

The programs that train with it (one process, one torchrun rank, the simulated pipeline) are in
:mod:`trgl_pipe.training`; this package imports nothing from there, from the stage or from the
run folder (an import-linter contract in CI keeps it so).
"""

from __future__ import annotations

from trgl_pipe.runtime.layout import Layout
from trgl_pipe.runtime.messages import Kind, Message

__all__ = ["Kind", "Layout", "Message"]
