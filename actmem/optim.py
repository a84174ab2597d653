"""Optimizers and per-step learning-rate schedules (the `optim=` group): two registries, OPTIMIZERS
(`optim.name`) and SCHEDULES (`optim.schedule`), filled below; a new one is one decorated function."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from actmem.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")


@OPTIMIZERS.register("sgd")
def sgd(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """Weight decay on every parameter, as the convnet recipes of the papers do."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """Norm scales and biases (the 1-d parameters) left undecayed, as transformer recipes do."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


# A schedule maps (progress through the post-warm-up steps in [0, 1], epoch, cfg) to an lr factor.
@SCHEDULES.register("cosine")
def cosine(progress: float, epoch: float, cfg) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@SCHEDULES.register("multistep")
def multistep(progress: float, epoch: float, cfg) -> float:
    return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


@SCHEDULES.register("onecycle")
def onecycle(progress: float, epoch: float, cfg) -> float:
    """Linear up to the peak over the first 30 %, then linear down to 0."""
    peak = 0.3
    return progress / peak if progress < peak else max(0.0, (1 - progress) / (1 - peak))


@SCHEDULES.register("constant")
def constant(progress: float, epoch: float, cfg) -> float:
    return 1.0


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.name).fn(model, cfg)


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, cfg) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then the schedule."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.warmup_start + (1 - cfg.warmup_start) * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return SCHEDULES.get(cfg.schedule).fn(progress, step / steps_per_epoch, cfg)


def build_scheduler(optimizer, total_steps: int, steps_per_epoch: int, cfg):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, steps_per_epoch, cfg))
