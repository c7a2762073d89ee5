"""What flows down the pipeline: batches to train on or evaluate, and markers.

Markers (epoch end, evaluation done, checkpoint, stop) travel in order with the batches, so each
module acts on them after exactly the batches that came before: a checkpoint marker yields a
consistent cut in which every module has trained on the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum

from torch import Tensor

SPLITS = ("val", "test")


class Kind(IntEnum):
    TRAIN = 0  # x, y: train on it, pass the detached output on
    EVAL = 1  # x, y: forward only, count correct predictions of every head
    EVAL_DONE = 2  # the evaluation of `epoch` is complete
    EPOCH_END = 3  # training epoch `epoch` is complete
    CHECKPOINT = 4  # save state now; position = (epoch, batch) of the next batch to train
    STOP = 5  # nothing follows

    @property
    def has_payload(self) -> bool:
        return self in (Kind.TRAIN, Kind.EVAL)


@dataclass(slots=True)
class Message:
    """One item of the stream. ``step`` counts training batches from 0 over the whole run."""

    kind: Kind
    x: Tensor | None = None
    y: Tensor | None = None
    epoch: int = 0
    batch: int = 0  # TRAIN: index in the epoch; CHECKPOINT: next batch to train in `epoch`
    step: int = 0  # TRAIN: global step; CHECKPOINT: number of steps done
    split: int = 0  # EVAL: index into SPLITS
    final: bool = False  # EVAL_DONE / CHECKPOINT: the last one of the run
    preempted: bool = False  # STOP: the run stops early (SIGTERM); every rank exits with 143
    image: Tensor | None = None  # TRAIN: the batch's input image, while a later module needs it

    @property
    def num_samples(self) -> int:
        return 0 if self.y is None else int(self.y.shape[0])

    def forward(self, x: Tensor | None, image: Tensor | None = None) -> Message:
        """The same message carrying the next module's input (and the image, if a later module
        reads it)."""
        return replace(self, x=x, image=image)
