"""The search loop: meta-steps on (α, β), each followed by one real step of the relaxed network
(or, with SEDONA's memory, of a snapshot drawn from it), on a validation part held out from the
training images; saved every few steps and resumable.

Every batch is drawn from generators seeded by (seed, step, ...), so a search is a function of
its config and options: run twice, or interrupted and resumed, it ends with the same α and β.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from trgl_pipe.config import Config
from trgl_pipe.data import _mix  # the data order's seed mixing, for the search's batches too
from trgl_pipe.errors import ConfigError, UserError
from trgl_pipe.io import atomic_write
from trgl_pipe.search.meta import Batch, InnerSGD, Lookahead, relaxed_gradient
from trgl_pipe.search.relaxed import RelaxedNetwork, build_relaxed
from trgl_pipe.search.result import Decision, decide, write_result


@dataclass(frozen=True)
class SearchOptions:
    """What the search runs (SEDONA's defaults where this does the same thing)."""

    budget: int = 200  # meta-steps; each trains the relaxed network one real step
    inner_steps: int = 5  # unrolled steps per meta-gradient (SEDONA: 5)
    objective: Literal["valid", "train"] = "valid"  # the paper's (valid) or the authors' code's (train)
    valid_fraction: float = 0.4  # of the training images, held out for the meta-objective
    max_depth: int = 4  # head depths 1..max_depth at every gap (SEDONA: 1-4)
    meta_lr: float = 1e-2  # Adam on α and β, betas (0.5, 0.999) (SEDONA's)
    meta_weight_decay: float = 1e-6
    smoothing: float = 0.1  # SEDONA's label smoothing of the heads' CE
    save_every: int = 25  # steps between saved states
    # SEDONA's weight memory: 0 = one relaxed network trains beside α and β (DARTS's scheme); N > 0
    # = N snapshots of a warm-up of `warmup` steps (uniform α, β), each meta-step starting from a
    # random one and storing its next step in place of the oldest (SEDONA: 50 of 40,000 steps)
    memory: int = 0
    warmup: int = 0

    def check(self) -> None:
        for name in ("budget", "inner_steps", "max_depth", "save_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if not 0 < self.valid_fraction < 1:
            raise UserError(f"--valid-fraction {self.valid_fraction} must be between 0 and 1")
        if not self.meta_lr > 0:
            raise UserError(f"--meta-lr {self.meta_lr} must be greater than 0")
        if not 0 <= self.smoothing < 1:
            raise UserError(f"--smoothing {self.smoothing} must be in [0, 1)")
        if self.memory < 0 or (self.memory and self.warmup < self.memory):
            raise UserError(
                f"--memory {self.memory} --warmup {self.warmup}: the memory holds snapshots of the "
                "warm-up, so give --warmup at least as many steps as --memory snapshots (or --memory 0)"
            )


class SearchData:
    """The training images split into the search's training and validation parts, and the
    seeded batches of each step."""

    def __init__(self, cfg: Config, valid_fraction: float, device: torch.device) -> None:
        from trgl_pipe.data import Batches, load_data

        data = load_data(cfg.data, cfg.seed)
        self.batches = Batches(data, cfg.data, cfg.seed)
        self.images, self.labels = data.train.images, data.train.labels
        self.num_classes = data.num_classes
        self.input_shape = self.batches.input_shape
        n = len(self.labels)
        held = round(n * valid_fraction)
        if held < 1 or n - held < 1:
            raise ConfigError(
                f"the search splits the {n} training images {1 - valid_fraction:.0%} / {valid_fraction:.0%}: "
                "one part is empty; use more images (data.train_size) or another --valid-fraction"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(cfg.seed, 21)))
        self.valid, self.train = order[:held], order[held:]
        self.batch_size = cfg.data.batch_size
        self.augment = cfg.data.augment
        self.seed = cfg.seed
        self.device = device

    def _draw(self, pool: Tensor, augment: bool, *tags: int) -> Batch:
        gen = torch.Generator().manual_seed(_mix(self.seed, *tags))
        index = pool[torch.randperm(len(pool), generator=gen)[: self.batch_size]]
        images = self.images[index]
        if augment:
            images = self.batches._augment(images, _mix(self.seed, 31, *tags), len(index), 0)
        x, y = self.batches.normalize(images), self.labels[index]
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_batch(self, step: int, j: int) -> Batch:
        return self._draw(self.train, self.augment, 22, step, j)

    def valid_batch(self, step: int) -> Batch:
        return self._draw(self.valid, False, 23, step)

    def warmup_batch(self, step: int) -> Batch:
        return self._draw(self.train, self.augment, 24, step)


def build_network(
    cfg: Config, num_classes: int, input_shape: tuple[int, int, int], max_depth: int, smoothing: float
) -> RelaxedNetwork:
    """The config's backbone, SEDONA's heads at every gap, and the last module's own head."""
    from trgl_pipe.stage import StagePlan, build_head, build_parts

    parts = build_parts(cfg, input_shape, num_classes)
    k = cfg.model.num_modules
    final = build_head(parts, StagePlan(k - 1, k, 0, parts.num_blocks), num_classes, cfg)
    return build_relaxed(cfg, parts, final, num_classes, max_depth, smoothing)


def cosine_lr(base: float, step: int, total: int, floor: float = 0.0) -> float:
    """``base`` at step 0 down to ``floor`` at ``total`` along a half cosine."""
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * step / total))


class Search:
    """The relaxed network, α and β, their optimizers and (with ``options.memory``) the snapshots
    each meta-step starts from; :meth:`state` and :meth:`load` save and restore all of it."""

    def __init__(self, cfg: Config, options: SearchOptions, data: SearchData, device: torch.device) -> None:
        self.cfg, self.options, self.data = cfg, options, data
        self.net = build_network(
            cfg, data.num_classes, data.input_shape, options.max_depth, options.smoothing
        )
        self.net.to(device)
        gaps = self.net.num_gaps
        if cfg.model.num_modules > gaps + 1:
            raise ConfigError(
                f"model.num_modules={cfg.model.num_modules} is more than the {gaps + 1} blocks of "
                f"model.arch={cfg.model.arch}; use at most {gaps + 1} modules"
            )
        self.alpha = torch.zeros(gaps, 2, device=device, requires_grad=True)
        self.beta = torch.zeros(gaps, options.max_depth, device=device, requires_grad=True)
        self.params = dict(self.net.named_parameters())
        optim = cfg.optim
        self.optimizer = torch.optim.SGD(
            self.params.values(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
        )
        self.meta_optimizer = torch.optim.Adam(
            [self.alpha, self.beta],
            lr=options.meta_lr,
            betas=(0.5, 0.999),
            weight_decay=options.meta_weight_decay,
        )
        self.history: list[float] = []
        self.memory: list[dict[str, Any]] = []  # {"position": steps trained, "network", "optimizer"}

    def _snapshot(self, position: int) -> dict[str, Any]:
        return {
            "position": position,
            "network": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    def _real_step(self, batch: Batch, lr: float, alpha: Tensor, beta: Tensor) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        detached = {k: p.detach() for k, p in self.params.items()}
        grads = relaxed_gradient(self.net, detached, alpha.detach(), beta.detach(), batch)
        for k, p in self.params.items():
            p.grad = grads[k]
        self.optimizer.step()

    def warm_up(self) -> None:
        """SEDONA's memory: ``warmup`` relaxed steps at uniform α and β, a snapshot every
        warmup/memory steps."""
        every = self.options.warmup // self.options.memory
        for w in range(self.options.warmup):
            lr = cosine_lr(self.cfg.optim.lr, w, self.options.warmup, self.cfg.optim.lr / 100)
            self._real_step(
                self.data.warmup_batch(w), lr, torch.zeros_like(self.alpha), torch.zeros_like(self.beta)
            )
            if (w + 1) % every == 0 and len(self.memory) < self.options.memory:
                self.memory.append(self._snapshot(w + 1))

    def meta_step(self, step: int) -> float:
        """One meta-step on α and β, then one real step of the relaxed network; returns J."""
        options, cfg = self.options, self.cfg
        position, horizon, floor = step, options.budget, 0.0
        if self.memory:  # start from a snapshot drawn by (seed, step); its next step replaces the oldest
            draw = torch.Generator().manual_seed(_mix(cfg.seed, 41, step))
            snapshot = self.memory[int(torch.randint(len(self.memory), (1,), generator=draw))]
            self.net.load_state_dict(snapshot["network"])
            self.optimizer.load_state_dict(snapshot["optimizer"])
            position, horizon = min(snapshot["position"], options.warmup), options.warmup
            floor = (
                cfg.optim.lr / 100
            )  # SEDONA's lr_min (1e-3 at lr 0.1): snapshots past the warm-up still learn
        lr = cosine_lr(cfg.optim.lr, position, horizon, floor)
        momenta = {
            k: self.optimizer.state[p]["momentum_buffer"].detach()
            if "momentum_buffer" in self.optimizer.state.get(p, {})
            else torch.zeros_like(p)
            for k, p in self.params.items()
        }
        sgd = InnerSGD(lr, cfg.optim.momentum, cfg.optim.weight_decay)
        unroll = [self.data.train_batch(step, j) for j in range(options.inner_steps)]
        valid = self.data.valid_batch(step)
        lookahead = Lookahead(self.net, self.params, momenta, unroll, valid, sgd, options.objective)
        g_alpha, g_beta, value = lookahead.gradient(self.alpha, self.beta)
        self.meta_optimizer.zero_grad()
        self.alpha.grad, self.beta.grad = g_alpha, g_beta
        self.meta_optimizer.step()
        self._real_step(self.data.train_batch(step, options.inner_steps), lr, self.alpha, self.beta)
        if self.memory:
            self.memory.append(self._snapshot(position + 1))
            self.memory.pop(0)
        self.history.append(float(value))
        return float(value)

    def state(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha.detach().clone(),
            "beta": self.beta.detach().clone(),
            "network": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "history": self.history,
            "memory": self.memory,
        }

    def load(self, saved: dict[str, Any]) -> None:
        with torch.no_grad():
            self.alpha.copy_(saved["alpha"])
            self.beta.copy_(saved["beta"])
        self.net.load_state_dict(saved["network"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.meta_optimizer.load_state_dict(saved["meta_optimizer"])
        self.history = saved["history"]
        self.memory = saved["memory"]

    def decision(self) -> Decision:
        k = self.cfg.model.num_modules
        last_depth = self.cfg.aux.for_module("depth", k - 1, k) or 1
        return decide(self.alpha.detach().cpu(), self.beta.detach().cpu(), k, last_depth)


def run_search(
    cfg: Config,
    options: SearchOptions,
    out: Path,
    header: list[str],
    resume: bool = False,
    stop_after: int | None = None,
    report: Callable[[int, float, Decision], None] | None = None,
) -> Decision | None:
    """Search, saving its state beside ``out`` every ``options.save_every`` steps (an interrupted
    search resumes from the last one); write ``out`` (search.yaml) and search.json at the end.
    ``stop_after`` steps end it early, its state saved, and return None."""
    from trgl_pipe.context import configure_torch, resolve_device

    options.check()
    configure_torch(cfg)  # threads (train.num_threads), determinism, the global seed
    state_path = out.with_suffix(".state.pt")
    if out.exists():
        raise UserError(f"{out} exists already; choose another --out or delete it")
    if state_path.exists() and not resume:
        raise UserError(f"{state_path} holds an interrupted search; add --resume to go on, or delete it")
    if cfg.model.num_modules < 2:
        raise ConfigError("model.num_modules must be at least 2: the search chooses where to cut")
    device = resolve_device(cfg.device)  # the config's: a GPU where there is one
    search = Search(cfg, options, SearchData(cfg, options.valid_fraction, device), device)
    fingerprint = {"config": cfg.to_dict(), "options": {**asdict(options), "save_every": None}}
    start, spent, spent_cpu = 0, 0.0, 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    if resume and state_path.exists():
        saved = torch.load(state_path, map_location=device, weights_only=True)
        if saved["fingerprint"] != fingerprint:
            raise UserError(
                f"{state_path} was saved by a search of another config or other options; "
                "run that search with --resume, or delete the file to start again"
            )
        search.load(saved["search"])
        start, spent, spent_cpu = saved["step"], saved["seconds"], saved["cpu_seconds"]
    elif options.memory:
        search.warm_up()

    def save(step: int) -> None:
        state = {
            "step": step,
            "search": search.state(),
            "seconds": spent + time.perf_counter() - t0,
            "cpu_seconds": spent_cpu + time.process_time() - c0,
            "fingerprint": fingerprint,
        }
        atomic_write(state_path, lambda handle: torch.save(state, handle))

    for step in range(start, options.budget):
        value = search.meta_step(step)
        if report is not None:
            report(step + 1, value, search.decision())
        if stop_after is not None and step + 1 >= stop_after and step + 1 < options.budget:
            save(step + 1)
            return None
        if (step + 1) % options.save_every == 0 and step + 1 < options.budget:
            save(step + 1)
    decision = search.decision()
    record = {
        "options": asdict(options),
        "config": cfg.to_dict(),
        "alpha": search.alpha.detach().cpu().tolist(),
        "beta": search.beta.detach().cpu().tolist(),
        "device": str(device),
        "meta_objective": search.history,
        "wall_s": round(spent + time.perf_counter() - t0, 3),
        "cpu_s": round(spent_cpu + time.process_time() - c0, 3),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    write_result(out, decision, cfg.model.num_modules, header, record)
    state_path.unlink(missing_ok=True)
    return decision
