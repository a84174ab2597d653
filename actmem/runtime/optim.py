"""Optimizers and per-step learning-rate schedules (the `optim=` group): two registries, OPTIMIZERS
(`optim.name`) and SCHEDULES (`optim.schedule`), filled below; a new one is one decorated function.

`optim.groups` gives named parameters their own lr and weight-decay multipliers, or a number of epochs
after which they stop training (airbench94's BatchNorm biases at 64x the lr, its whitening bias trained
for 3 epochs); parameters frozen when the model is built (requires_grad False) are left out."""
from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn as nn

from actmem.core.errors import ConfigError
from actmem.core.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")


# An optimizer entry: (model, cfg) -> optimizer; `param_groups` gives it the groups, lr and decay set.
@OPTIMIZERS.register("sgd")
def sgd(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """Weight decay on every parameter, as the convnet recipes of the papers do."""
    return torch.optim.SGD(param_groups(model, cfg, decays=lambda p: True), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov)


@OPTIMIZERS.register("adamw")
def adamw(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """Norm scales and biases (the 1-d parameters) left undecayed, as transformer recipes do."""
    return torch.optim.AdamW(param_groups(model, cfg, decays=lambda p: p.ndim > 1), lr=cfg.lr,
                             betas=tuple(cfg.betas))


def _matches(name: str, group) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in group.params)


def param_groups(model: nn.Module, cfg, decays) -> list[dict]:
    """The trainable parameters split by (first matching entry of optim.groups, decays(p)), each group
    with lr = optim.lr * lr_scale and weight_decay = optim.weight_decay * weight_decay_scale (0 where
    `decays` says no). PyTorch's weight decay is scaled by the lr: a group with lr_scale k and
    weight_decay_scale 1/k decays as fast as the rest (the airbench94 BN biases)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for i, group in enumerate(cfg.groups):
        if not any(_matches(n, group) for n, _ in named):
            raise ConfigError(f"optim.groups[{i}].params={list(group.params)} matches no trainable parameter of "
                              f"this model, whose parameters are named like {', '.join(n for n, _ in named[:4])}, "
                              "... Where the groups come with a preset (experiment=...) written for another model, "
                              "drop them with optim.groups=[]; otherwise give shell-style patterns of this model's "
                              "names ('*' for any part, e.g. 'layers.*.bn*.bias').")
    buckets: dict[tuple[int, bool], list] = {}
    for n, p in named:
        index = next((i for i, g in enumerate(cfg.groups) if _matches(n, g)), -1)
        buckets.setdefault((index, bool(decays(p))), []).append(p)
    groups = []  # the plain parameters first: their lr is the one logged (get_last_lr()[0])
    for (index, decay), params in sorted(buckets.items(), key=lambda kv: (kv[0][0] >= 0, kv[0][0], not kv[0][1])):
        g = cfg.groups[index] if index >= 0 else None
        lr_scale, wd_scale = (g.lr_scale, g.weight_decay_scale) if g is not None else (1.0, 1.0)
        groups.append({"params": params, "lr": cfg.lr * lr_scale,
                       "weight_decay": cfg.weight_decay * wd_scale if decay else 0.0})
    return groups


def set_trainable(model: nn.Module, cfg, epoch: int) -> None:
    """At the start of each epoch: parameters of a group with `train_epochs` train only while epoch <
    train_epochs (their gradient is then None, and SGD / AdamW skip them: no decay, no momentum)."""
    for group in cfg.groups:
        if group.train_epochs is not None:
            for name, p in model.named_parameters():
                if _matches(name, group):
                    p.requires_grad_(epoch < group.train_epochs)


# A schedule maps (step, steps: the post-warm-up step and their number; epoch, cfg) to an lr factor.
@SCHEDULES.register("cosine")
def cosine(step: int, steps: int, epoch: float, cfg) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))


@SCHEDULES.register("multistep")
def multistep(step: int, steps: int, epoch: float, cfg) -> float:
    return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


@SCHEDULES.register("onecycle")
def onecycle(step: int, steps: int, epoch: float, cfg) -> float:
    """Linear from cycle_start to 1 at step int(cycle_peak * steps), then linear to cycle_end at the last
    step (defaults 0, 0.3, 0; airbench94's `triangle` is 0.2, 0.23, 0.07)."""
    peak = int(cfg.cycle_peak * steps)
    if step < peak:
        return cfg.cycle_start + (1 - cfg.cycle_start) * step / peak
    return 1 + (cfg.cycle_end - 1) * min(1.0, (step - peak) / max(1, steps - peak))


@SCHEDULES.register("constant")
def constant(step: int, steps: int, epoch: float, cfg) -> float:
    return 1.0


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.name).fn(model, cfg)


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, cfg) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then the schedule."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.warmup_start + (1 - cfg.warmup_start) * step / warmup
    return SCHEDULES.get(cfg.schedule).fn(step - warmup, max(1, total_steps - warmup), step / steps_per_epoch, cfg)


def build_scheduler(optimizer, total_steps: int, steps_per_epoch: int, cfg):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, steps_per_epoch, cfg))
