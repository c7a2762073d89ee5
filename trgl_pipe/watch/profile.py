"""``debug.profile_steps: [a, b]``: torch.profiler around training steps a..b, one trace per rank.

The profiler starts before the rank's first module trains step a and stops after it trained
step b; each step is marked ``ProfilerStep#<step>`` (the module's step). Everything the process
does in between (the other modules of the rank, waits, messages) is in the trace. Each rank
writes ``out_dir/profile/rank<r>.<ns>.pt.trace.json`` through torch's TensorBoard trace handler:
Perfetto and chrome://tracing open it, and TensorBoard's profiler plugin finds it under
``out_dir/profile``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function, tensorboard_trace_handler

from trgl_pipe.runtime.messages import Kind, Message


class StepProfiler:
    """Profiles steps ``first``..``last`` of one worker's module; writes one trace."""

    def __init__(self, first: int, last: int, folder: Path, name: str, device: torch.device) -> None:
        self.first, self.last = first, last
        self.folder = folder
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        folder.mkdir(parents=True, exist_ok=True)
        self._profiler = profile(
            activities=activities, on_trace_ready=tensorboard_trace_handler(str(folder), worker_name=name)
        )
        self.state = "waiting"  # -> "running" -> "done"

    def attach(self, worker: Any) -> None:
        """Wrap ``worker.handle`` so its training steps start, mark and stop the profiler."""
        handle: Callable[[Message], Message] = worker.handle

        def profiled(msg: Message) -> Message:
            if msg.kind is not Kind.TRAIN or self.state == "done":
                return handle(msg)
            step = worker.stage.num_steps + 1
            if self.state == "waiting" and step >= self.first:
                self._profiler.start()
                self.state = "running"
            if self.state != "running":
                return handle(msg)
            # named as torch names its steps, so TensorBoard's profiler plugin shows a step view
            with record_function(f"ProfilerStep#{step}"):
                out = handle(msg)
            if step >= self.last:
                self.stop()
            return out

        worker.handle = profiled

    def stop(self) -> None:
        """Stop and write the trace (also when training ended inside the window)."""
        if self.state == "running":
            self._profiler.stop()
        self.state = "done"


def profiler_for(cfg: Any, worker: Any, name: str) -> StepProfiler | None:
    """A profiler attached to ``worker`` when ``debug.profile_steps`` asks for one."""
    steps = cfg.debug.profile_steps
    if steps is None:
        return None
    profiler = StepProfiler(steps[0], steps[1], Path(cfg.out_dir) / "profile", name, worker.stage.device)
    profiler.attach(worker)
    return profiler
