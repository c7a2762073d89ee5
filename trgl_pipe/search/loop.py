"""The search loop: meta-steps on (α, β), each followed by one real step of the relaxed network,
on a validation part held out from the training images; saved every few steps and resumable.

Every batch is drawn from generators seeded by (seed, step, ...), so a search is a function of
its config and options: run twice, or interrupted and resumed, it ends with the same α and β.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from trgl_pipe.config import Config
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


def _mix(*numbers: int) -> int:
    value = 0
    for n in numbers:
        value = (value * 1_000_003 + n + 1) & 0x7FFFFFFFFFFFFFFF
    return value


@dataclass
class SearchState:
    """What a resumed search needs: the step, α, β, both optimizers and the relaxed network."""

    step: int
    alpha: Tensor
    beta: Tensor
    network: dict[str, Any]
    optimizer: dict[str, Any]
    meta_optimizer: dict[str, Any]
    history: list[float]
    seconds: float  # wall and CPU seconds spent before this state was saved
    cpu_seconds: float
    fingerprint: dict[str, Any]


def build_network(
    cfg: Config, num_classes: int, input_shape: tuple[int, int, int], max_depth: int, smoothing: float
) -> RelaxedNetwork:
    """The config's backbone, SEDONA's heads at every gap, and the last module's own head."""
    from trgl_pipe.stage import StagePlan, build_head, build_parts

    parts = build_parts(cfg, input_shape, num_classes)
    k = cfg.model.num_modules
    final = build_head(parts, StagePlan(k - 1, k, 0, parts.num_blocks), num_classes, cfg)
    return build_relaxed(cfg, parts, final, num_classes, max_depth, smoothing)


def cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * step / total))


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
    data = SearchData(cfg, options.valid_fraction, device)
    net = build_network(cfg, data.num_classes, data.input_shape, options.max_depth, options.smoothing)
    net.to(device)
    gaps = net.num_gaps
    if cfg.model.num_modules > gaps + 1:
        raise ConfigError(
            f"model.num_modules={cfg.model.num_modules} is more than the {gaps + 1} blocks of "
            f"model.arch={cfg.model.arch}; use at most {gaps + 1} modules"
        )
    alpha = torch.zeros(gaps, 2, device=device, requires_grad=True)
    beta = torch.zeros(gaps, options.max_depth, device=device, requires_grad=True)
    params = dict(net.named_parameters())
    optimizer = torch.optim.SGD(
        params.values(), lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )
    meta_optimizer = torch.optim.Adam(
        [alpha, beta], lr=options.meta_lr, betas=(0.5, 0.999), weight_decay=options.meta_weight_decay
    )
    fingerprint = {"config": cfg.to_dict(), "options": {**asdict(options), "save_every": None}}
    history: list[float] = []
    start, spent, spent_cpu = 0, 0.0, 0.0
    if resume and state_path.exists():
        saved = SearchState(**torch.load(state_path, map_location=device, weights_only=True))
        if saved.fingerprint != fingerprint:
            raise UserError(
                f"{state_path} was saved by a search of another config or other options; "
                "run that search with --resume, or delete the file to start again"
            )
        start, history, spent, spent_cpu = saved.step, saved.history, saved.seconds, saved.cpu_seconds
        with torch.no_grad():
            alpha.copy_(saved.alpha)
            beta.copy_(saved.beta)
        net.load_state_dict(saved.network)
        optimizer.load_state_dict(saved.optimizer)
        meta_optimizer.load_state_dict(saved.meta_optimizer)
    t0, c0 = time.perf_counter(), time.process_time()

    def save(step: int) -> None:
        state = SearchState(
            step,
            alpha.detach().clone(),
            beta.detach().clone(),
            net.state_dict(),
            optimizer.state_dict(),
            meta_optimizer.state_dict(),
            history,
            spent + time.perf_counter() - t0,
            spent_cpu + time.process_time() - c0,
            fingerprint,
        )
        atomic_write(state_path, lambda handle: torch.save(asdict(state), handle))

    last_depth = cfg.aux.for_module("depth", cfg.model.num_modules - 1, cfg.model.num_modules) or 1
    for step in range(start, options.budget):
        lr = cosine_lr(cfg.optim.lr, step, options.budget)
        for group in optimizer.param_groups:
            group["lr"] = lr
        momenta = {
            k: optimizer.state[p]["momentum_buffer"].detach()
            if "momentum_buffer" in optimizer.state.get(p, {})
            else torch.zeros_like(p)
            for k, p in params.items()
        }
        sgd = InnerSGD(lr, cfg.optim.momentum, cfg.optim.weight_decay)
        unroll = [data.train_batch(step, j) for j in range(options.inner_steps)]
        lookahead = Lookahead(net, params, momenta, unroll, data.valid_batch(step), sgd, options.objective)
        g_alpha, g_beta, value = lookahead.gradient(alpha, beta)
        meta_optimizer.zero_grad()
        alpha.grad, beta.grad = g_alpha, g_beta
        meta_optimizer.step()
        grads = relaxed_gradient(
            net,
            {k: p.detach() for k, p in params.items()},
            alpha.detach(),
            beta.detach(),
            data.train_batch(step, options.inner_steps),
        )
        for k, p in params.items():
            p.grad = grads[k]
        optimizer.step()
        history.append(float(value))
        if report is not None:
            report(
                step + 1,
                float(value),
                decide(alpha.detach(), beta.detach(), cfg.model.num_modules, last_depth),
            )
        if stop_after is not None and step + 1 >= stop_after and step + 1 < options.budget:
            save(step + 1)
            return None
        if (step + 1) % options.save_every == 0 and step + 1 < options.budget:
            save(step + 1)
    decision = decide(alpha.detach().cpu(), beta.detach().cpu(), cfg.model.num_modules, last_depth)
    record = {
        "options": asdict(options),
        "config": cfg.to_dict(),
        "alpha": alpha.detach().cpu().tolist(),
        "beta": beta.detach().cpu().tolist(),
        "device": str(device),
        "meta_objective": history,
        "wall_s": round(spent + time.perf_counter() - t0, 3),
        "cpu_s": round(spent_cpu + time.process_time() - c0, 3),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    write_result(out, decision, cfg.model.num_modules, header, record)
    state_path.unlink(missing_ok=True)
    return decision
