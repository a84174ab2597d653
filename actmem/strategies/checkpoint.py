"""Recomputation (activation checkpointing): keep each block's input, recompute its inside in backward.

Built on `torch.utils.checkpoint` (non-reentrant). Two details a plain wrapper gets wrong:
- BatchNorm running statistics would be updated twice (forward and recomputation); the
  recomputation runs with them frozen, so the statistics match exact training.
- The checkpoint keeps the block input in a closure that `saved_tensors_hooks` cannot see; a
  pass-through Function saves it visibly (same storage, no extra memory) so `activation_bytes`
  counts what is really kept.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from actmem import models
from actmem.core.errors import ConfigError, StrategyError
from actmem.strategies.base import STRATEGIES, Claimed, replace_modules

GRANULARITIES = ("block", "stage")


@dataclass
class CheckpointConfig:
    name: str = "checkpoint"
    granularity: str = "block"  # "block": every residual/dense/transformer block; "stage": each run of blocks


class _KeepVisible(torch.autograd.Function):
    """Identity whose saved input shows the bytes a checkpoint holds to autograd's hooks."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


@contextmanager
def frozen_batchnorm_stats(module: nn.Module):
    """Run BatchNorms with their running statistics untouched (momentum 0, counter restored)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class Checkpointed(Claimed):
    """Mixin: `Checkpointed.swap(block)` is the block (same parameters and state_dict keys), its
    forward recomputed in backward."""

    def forward(self, *args):
        tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a]) if torch.is_tensor(t)]
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return super().forward(*args)
        args = [_visible(a) for a in args]
        context = lambda: (nullcontext(), frozen_batchnorm_stats(self))  # noqa: E731
        return checkpoint(super().forward, *args, use_reentrant=False, context_fn=context)


def _visible(arg):
    """Pass tensors (alone or in a list, as torchvision's dense layers take them) through _KeepVisible."""
    if isinstance(arg, (list, tuple)):
        return type(arg)(_visible(a) for a in arg)
    return _KeepVisible.apply(arg) if torch.is_tensor(arg) and arg.requires_grad else arg


def _is_block(module: nn.Module) -> bool:
    return isinstance(module, models.block_types())


def check_checkpoint(cfg) -> None:
    if cfg.granularity not in GRANULARITIES:
        raise ConfigError(f"strategy.granularity={cfg.granularity!r}: use one of {', '.join(GRANULARITIES)}.")


@STRATEGIES.register("checkpoint", schema=CheckpointConfig, check=check_checkpoint)
def apply_checkpoint(model: nn.Module, cfg) -> nn.Module:
    if cfg.granularity == "block":
        select = lambda name, m: _is_block(m)  # noqa: E731
    else:  # a stage: a Sequential whose children are blocks
        select = lambda name, m: isinstance(m, nn.Sequential) and any(map(_is_block, m.children()))  # noqa: E731
    replaced = replace_modules(model, select, Checkpointed.swap)
    if not replaced:
        raise StrategyError(
            f"checkpoint (granularity={cfg.granularity}) found no {cfg.granularity} to wrap in "
            f"{type(model).__name__}; it needs residual/dense/transformer blocks "
            f"({', '.join(t.__name__ for t in models.block_types())}). Try strategy.granularity=block."
        )
    return model
