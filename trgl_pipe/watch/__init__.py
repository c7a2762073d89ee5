"""Where researchers look: TensorBoard and Weights & Biases series of a run, and its timeline.

One process per run writes them (rank 0 of a pipeline): :class:`RunWatch` follows the metrics
files every rank already writes and the progress board they already publish to, in a thread of
its own, so watching adds no collective and no wait to the training path.
"""

from trgl_pipe.watch.follow import RunWatch, open_watch

__all__ = ["RunWatch", "open_watch"]
