"""Activations written in torch primitives, as many codebases define their own: autograd keeps several
intermediates of each (not just the input), and forward_ad serves them when named in
`strategy.elementwise`. Used by its tests and scripts/vit_memory.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GeluTanh(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))


class MishPrim(nn.Module):
    def forward(self, x):
        return x * torch.tanh(F.softplus(x))


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)
