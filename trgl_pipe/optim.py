"""Per-module optimizer and LR schedule (each module steps its own, counting its own steps)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from trgl_pipe.config import OptimConfig


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the base LR before optimizer step ``step`` (0-based) of ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if cfg.schedule == "cosine":
        floor = cfg.min_lr / cfg.lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    passed = sum(1 for m in cfg.milestones if progress >= m)
    return cfg.gamma**passed


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The module's LR schedule, stepped once after every optimizer step.

    With ``optim.schedule_steps`` the horizon is fixed, not the run's: torch's own
    CosineAnnealingLR(T_max=schedule_steps, eta_min=min_lr), the authors' schedule, so the rates
    are the same floats as theirs step for step (its update is recursive, not the closed form).
    """
    if cfg.schedule_steps is not None:
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=cfg.schedule_steps, eta_min=cfg.min_lr
        )
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg)
    )
