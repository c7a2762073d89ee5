"""The pipeline runtime: how module-wise training runs across workers without locking.

Data flows one way: the message stream (``schedule``) → each worker applies messages to its
stage (``worker``) in the same loop everywhere (``loop``) → bounded buffers (``buffer``) and
links (``transport``) carry the detached outputs on. ``mesh`` creates the process groups,
``rank`` is the program of one torchrun rank, ``sim`` runs the same loop in threads of one
process, ``preemption`` turns SIGTERM into a checkpoint and a clean stop.

Ways in: :func:`run_rank` (under torchrun) and :func:`run_simulated` (one process).
"""

from trgl_pipe.runtime.messages import Kind, Message
from trgl_pipe.runtime.rank import run_rank
from trgl_pipe.runtime.sim import run_simulated
from trgl_pipe.runtime.worker import StageWorker

__all__ = ["Kind", "Message", "StageWorker", "run_rank", "run_simulated"]
