"""The model registry and the init every CNN here shares.

Models are written for strategies that rewrite them by swapping submodules: every activation and
pooling is its own module at each use site, and forwards have no data-dependent Python control flow
(so `torch.fx.symbolic_trace` sees the BN -> ReLU -> Conv chains).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from actmem.core.registry import Registry

MODELS = Registry("model")


class MatMul(nn.Module):
    """`a @ b` as a module, so that a strategy can swap what it keeps for backward (attention's
    scores and mixing are products of two activations, which autograd keeps whole)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


def init_cnn_(model: nn.Module) -> None:
    """Kaiming-normal convs (fan-out, as torchvision), BN weight 1 / bias 0, Linear bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
