"""Optimizers and per-step learning-rate schedules (warm-up, then cosine / multistep / one-cycle)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    # Weight decay on weights only: BatchNorm/LayerNorm scales and biases are left undecayed only for
    # AdamW (the convnet recipes in ANCHORS.md decay every parameter with SGD).
    params = list(model.parameters())
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, cfg) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.warmup_start + (1 - cfg.warmup_start) * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "multistep":
        epoch = step / steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "onecycle":  # linear up to the peak over the first 30%, then linear down to 0
        peak = 0.3
        return progress / peak if progress < peak else max(0.0, (1 - progress) / (1 - peak))
    return 1.0  # constant


def build_scheduler(optimizer, total_steps: int, steps_per_epoch: int, cfg):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, steps_per_epoch, cfg))
