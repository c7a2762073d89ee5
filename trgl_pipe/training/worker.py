"""StageWorker: applies the message stream to one stage. The same code serves every regime,
the in-process simulation and the torch.distributed ranks; only how messages arrive differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psutil
import torch

from trgl_pipe.runtime.clock import Clock, HostClock
from trgl_pipe.runtime.messages import SPLITS, Kind, Message
from trgl_pipe.stage import Stage
from trgl_pipe.training.from_next import NextGradient, NextWeights
from trgl_pipe.watch.metrics import MetricsLogger, peak_memory_bytes

CheckpointHook = Callable[["StageWorker", Message], None]


WIRE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StageWorker:
    """Turns each incoming message into the outgoing one for stage ``stage.index``."""

    def __init__(
        self,
        stage: Stage,
        logger: MetricsLogger,
        log_every_steps: int,
        checkpoint_hook: CheckpointHook | None = None,
        clock: Clock | None = None,
        log_fields: dict[str, Any] | None = None,
    ) -> None:
        self.stage = stage
        self.log_fields = log_fields or {}  # added to every event (the replica of a stage)
        self.logger = logger
        self.log_every_steps = log_every_steps
        self.checkpoint_hook = checkpoint_hook
        self.clock: Clock = clock or HostClock()  # shared by the modules of one rank
        self.eval_history: list[dict[str, Any]] = []
        self.last_eval: dict[str, dict[str, float]] = {}
        self.epoch = 0
        self.stopped = False
        self.stop_message: Message | None = None
        self.train_samples = 0
        self.started = time.perf_counter()
        self.finished: float | None = None
        self.faults: Callable[[StageWorker, bool], None] | None = None
        self.total_steps = stage.total_steps
        self.epochs = 0  # set by the run: for progress and ETA
        self.wire_dtype: torch.dtype | None = None  # what the output is cast to for the next module
        self.reads_image = False  # the stage's objective reads the batch's image
        self.passes_image = False  # a later module reads it: it travels on with the output
        # work in flight saved with the module (delayed-gradient regimes): state_dict,
        # load_state_dict and report, or None
        self.carry: Any = None
        # weights (MAN) or a gradient (HPFF) from the next module: set by make_worker, linked by the run
        self.next_weights: NextWeights | None = None
        self.next_gradient: NextGradient | None = None

    @property
    def index(self) -> int:
        return self.stage.index

    def handle(self, msg: Message) -> Message:
        """Apply ``msg`` to the stage and return what the next stage should receive."""
        kind = msg.kind
        if kind is Kind.TRAIN:
            if self.faults is not None:
                self.faults(self, True)
            # the first module's input is the image itself
            image = msg.x if self.index == 0 else msg.image
            with self.clock.region(f"train/{self.index}"):
                read = image if self.reads_image else None
                if self.next_gradient is not None:
                    out = self.next_gradient.train_step(msg.x, msg.y, read)
                elif self.carry is None:
                    if self.next_weights is not None:
                        self.next_weights.before_step()
                    out = self.stage.train_step(msg.x, msg.y, read)
                    if self.next_weights is not None:
                        self.next_weights.after_step()
                else:  # a delayed-gradient regime on a pipeline rank
                    out = self.carry.train_message(msg)
            self.train_samples += msg.num_samples
            self.epoch = msg.epoch
            if self.stage.num_steps % self.log_every_steps == 0 and self.stage.train_sums.steps:
                self._log_train()
            return msg.forward(self._for_wire(out), image if self.passes_image else None)
        if kind is Kind.EVAL:
            if self.faults is not None:
                self.faults(self, False)
            with self.clock.region(f"eval/{self.index}"):
                out = self.stage.eval_step(msg.x, msg.y, SPLITS[msg.split])
            return msg.forward(self._for_wire(out))
        if kind is Kind.EVAL_DONE:
            self._finish_eval(msg.epoch)
        elif kind is Kind.EPOCH_END:
            self.stage.check_finite()
            self.logger.log(
                "epoch_end",
                module=self.index,
                epoch=msg.epoch,
                step=self.stage.num_steps,
                peak_memory_bytes=peak_memory_bytes(self.stage.device),
                rss_bytes=psutil.Process().memory_info().rss,
            )
        elif kind is Kind.CHECKPOINT:
            self.stage.check_finite()
            if self.carry is not None:
                self.carry.before_checkpoint(msg)
            if self.checkpoint_hook is not None:
                self.checkpoint_hook(self, msg)
        elif kind is Kind.STOP:
            if self.stage.train_sums.steps:
                self._log_train()
            self.finished = time.perf_counter()
            self.stopped = True
            self.stop_message = msg
        return msg

    def _for_wire(self, out: torch.Tensor) -> torch.Tensor:
        """The output as the next module receives it: cast to ``pipeline.wire_dtype`` here, in
        every transport, so the pipeline and one process see the same numbers."""
        if self.wire_dtype is None or not out.is_floating_point():
            return out
        return out.to(self.wire_dtype)

    def restart_clock(self) -> None:
        """Count elapsed time from now (training begins), not from when the worker was built."""
        self.started = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    @property
    def train_compute_s(self) -> float:
        return self.clock.total(f"train/{self.index}")

    @property
    def compute_s(self) -> float:
        return self.train_compute_s + self.clock.total(f"eval/{self.index}")

    def _log_train(self) -> None:
        self.stage.check_finite()
        stats = self.stage.pop_train_stats()
        self.logger.log(
            "train",
            module=self.index,
            **self.log_fields,
            epoch=self.epoch,
            step=self.stage.num_steps,
            lr=self.stage.lr,
            **stats,
            **{
                k: v for k, v in self.stage.objective.describe().items() if k != "label"
            },  # per line: no label
        )

    def _finish_eval(self, epoch: int) -> None:
        results = self.stage.pop_eval_results()
        self.last_eval = results
        record = {
            "epoch": epoch,
            **{f"{s}_{k}": v[k] for s, v in results.items() for k in ("accuracy", "kinetic_energy")},
        }
        self.eval_history.append(record)
        for split, values in results.items():
            self.logger.log(
                "eval",
                module=self.index,
                **self.log_fields,
                epoch=epoch,
                step=self.stage.num_steps,
                split=split,
                **values,
            )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this module exactly: stage state and eval history."""
        return {
            "stage": self.stage.state_dict(),
            "eval_history": self.eval_history,
            "last_eval": self.last_eval,
            "epoch": self.epoch,
            **({"carry": self.carry.state_dict()} if self.carry is not None else {}),
            **({"next_weights": self.next_weights.state_dict()} if self.next_weights is not None else {}),
            **({"next_gradient": self.next_gradient.state_dict()} if self.next_gradient is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage.load_state_dict(state["stage"])
        self.eval_history = list(state["eval_history"])
        self.last_eval = dict(state["last_eval"])
        self.epoch = int(state["epoch"])
        if self.carry is not None and "carry" in state:
            self.carry.load_state_dict(state["carry"])
        if self.next_weights is not None and "next_weights" in state:
            self.next_weights.load_state_dict(state["next_weights"])
        if self.next_gradient is not None and "next_gradient" in state:
            self.next_gradient.load_state_dict(state["next_gradient"])

    def live_snapshot(self) -> dict[str, Any]:
        """Progress for the live view (a few host syncs: call it at most every interval)."""
        stage = self.stage
        weight = stage.objective.describe()
        if weight["tau"] is not None:
            shown = f"τ={weight['tau']:g}"
        elif weight["lambda"] is not None:
            shown = f"λ={weight['lambda']:.4g}"
        else:
            shown = weight.get("label", weight.get("method", "VanGL"))
        elapsed = self.elapsed_s
        val = self.last_eval.get("val", {}).get("accuracy")
        return {
            "module": self.index,
            "epoch": self.epoch,
            "epochs": self.epochs,
            "step": stage.num_steps,
            "total_steps": self.total_steps,
            "elapsed_s": round(elapsed, 2),
            "samples_per_s": round(self.train_samples / elapsed, 2) if elapsed > 0 else 0.0,
            "loss": None if stage.last_loss is None else float(stage.last_loss),
            "kinetic": None if stage.last_kinetic is None else float(stage.last_kinetic),
            "weight": shown,
            "val_accuracy": val,
        }

    def report(self) -> dict[str, Any]:
        """What the summary needs from this module (JSON-serialisable)."""
        val = self.last_eval.get("val", {})
        test = self.last_eval.get("test", {})
        plan = self.stage.plan
        return {
            "index": self.index,
            "blocks": [plan.start, plan.stop],
            "val_accuracy": val.get("accuracy"),
            "test_accuracy": test.get("accuracy"),
            "kinetic_energy": val.get("kinetic_energy", test.get("kinetic_energy")),
            "block_kinetic_energy": val.get("block_kinetic_energy", test.get("block_kinetic_energy")),
            **self.stage.objective.describe(),
            "num_params": self.stage.num_params,
            "body_params": self.stage.num_body_params,
            "head_params": self.stage.num_head_params,
            **({"aux_params": self.stage.num_aux_params} if self.stage.extended else {}),
            "num_steps": self.stage.num_steps,
            "compute_s": round(self.train_compute_s, 4),
            "history": self.eval_history,
            **(self.carry.report() if self.carry is not None else {}),
        }


def make_worker(
    stage: Stage,
    cfg: Any,
    logger: MetricsLogger,
    checkpoint_hook: CheckpointHook | None,
    clock: Clock | None = None,
    log_fields: dict[str, Any] | None = None,
) -> StageWorker:
    """A worker for ``stage`` with the run's logging, checkpoint hook and any injected faults."""
    from trgl_pipe.faults import fault_hook
    from trgl_pipe.objectives import needs_image

    worker = StageWorker(stage, logger, cfg.log.every_steps, checkpoint_hook, clock, log_fields)
    worker.faults = fault_hook(cfg.debug, stage.index)
    worker.epochs = cfg.train.epochs
    num_modules = stage.plan.num_modules
    worker.reads_image = needs_image(cfg, stage.index, num_modules)
    if cfg.pipeline.wire_dtype is not None and stage.index < num_modules - 1:
        worker.wire_dtype = WIRE_DTYPES[cfg.pipeline.wire_dtype]
    if "weights" in stage.objective.needs_from_next and stage.objective.weights_every > 0:
        worker.next_weights = NextWeights(stage)
    if "gradient" in stage.objective.needs_from_next and cfg.train.regime == "parallel":
        worker.next_gradient = NextGradient(stage)
    worker.passes_image = any(needs_image(cfg, k, num_modules) for k in range(stage.index + 1, num_modules))
    return worker
