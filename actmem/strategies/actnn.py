"""ActNN (Chen et al., ICML 2021; official code ucbrise/actnn: `actnn/conf.py`, `qscheme.py`,
`qbnscheme.py`, `ops.py`, `layers.py`, `cpp_extension/calc_precision.cc`).

Levels, as the official `set_optimization_level`:
- L0: ReLU and Dropout keep a 1-bit mask, MaxPool2d the argmax inside its window; Conv, Linear and
  BatchNorm save their input as exact training does (so L0 keeps about as much as exact).
- L1: + Conv/Linear inputs at 4 bits (`compress.quantize`: per-sample groups of 256 over C*H*W,
  bf16 min and step, stochastic rounding); BatchNorm stays exact.
- L2: + BatchNorm inputs at 4 bits; here also LayerNorm inputs, Softmax outputs and both operands of
  `MatMul` (attention), which the paper's layer set does not cover (see below).
- L3 (default): 2 bits on average with per-sample and per-layer mixed precision (below).
The official L3.1, L4, L5 and "swap" add memory-system tricks (cudnn autotuning off, cache
emptying, micro-batched conv backward, swapping to CPU, a patched allocator) and keep the same state
as L3 (or, for "swap", none compressed); they are not offered. `bits` overrides the width: at L1/L2
the uniform width (1, 2, 4 or 8), at L3 the average budget (1 to 8, need not be a whole number).

L3 (QScheme for Conv/Linear, QBNScheme for BatchNorm):
- Sensitivity of sample n at a Conv/Linear layer: C_n = k/(4 g) * ||R_n||^2 * G/P * s, with R_n the
  per-group ranges of sample n, G = 256, P the input's pixels per channel, k the kernel's locations,
  g the conv groups, and s = E_n ||grad_out_n||^2 from the layer's last backward.
- Each forward splits a layer's budget b_l (N * b_l bits in all) across its N samples greedily,
  minimising sum_n C_n / (2^b_n - 1)^2 with b_n from 8 down to 1 (the common factor s does not change
  the split). After each backward the layers' budgets are reallocated jointly: the same greedy over
  every (layer, sample) pair, each weighing the elements per sample its width covers, under the
  average `bits`; b_l = mean over its samples (done at the first forward after the backward).
- BatchNorm (and LayerNorm, Softmax, MatMul): the budget of the Conv/Linear layer that ran last
  before it (the average budget before any has run), split across samples by ||R_n||^2 alone. That
  layer's weight in the joint allocation counts these borrowed elements too, so `bits` is the average
  over every compressed element; the official code counts only Conv/Linear inputs, and its BatchNorms
  can lift the real average above `bits` (measured on resnet50, 224x224, batch 4, random data: 10.7x
  less memory than exact after the first step with the official rule, 12.1x with this one).
- First iteration: no gradient has been seen yet. The official code starts from s = 0, which makes
  every C_n zero and its heap's split arbitrary (by sample index). Here every layer starts at the
  average budget and splits it by ranges; the joint per-layer allocation starts after the first
  backward. A layer that never gets a gradient (frozen) keeps the average budget.
- The greedy is the official heap (calc_precision.cc) vectorised: an item's decrements 8->7, ...,
  2->1 cost C_i ((2^(b-1)-1)^-2 - (2^b-1)^-2) / w_i, increasing in order, so the heap takes the
  cheapest decrements in sorted order until the budget is met: one argsort and one cumsum per call.

Other differences from the official code: average pooling stays average pooling (the official
`QAvgPool2d` silently runs max pooling); the max-pool index takes ceil(log2(k*k)) bits (4 for 3x3),
not a byte (Dropout keeps a 1-bit mask, as the official `QDropout` does); the last partial
group of a sample does not count its padding in the ranges (the official code pads with zeros);
ConvTranspose and SyncBatchNorm stay exact (the official code has layers for them); the official scale
(2^b - 1) / (max - min + 2e-6) widens every group's range by 2e-6, while here the step (max - min) / (2^b - 1)
has no epsilon: min is rounded down and the step up to bf16 instead, so that no code exceeds 2^b - 1.
Transformer
pieces are an extension: the paper and its code target CNNs, and on a ViT they would leave LayerNorm
inputs, the attention's q/k/v and the softmax output (70% of vit_tiny's saved bytes outside the MLP)
kept whole. Here they are quantized like BatchNorm inputs (per-sample groups, borrowed budget), as
ActNN's successor GACT (Liu et al., ICML 2022) compresses every saved tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from actmem import compress
from actmem.compress.packed import Packed
from actmem.core.errors import ConfigError, StrategyError
from actmem.strategies.base import STRATEGIES
from actmem.strategies.layers import BATCHNORM, TRANSFORMER, Codec, swap_layers

LEVELS = ("L0", "L1", "L2", "L3")
BORROWERS = {**BATCHNORM, **TRANSFORMER}  # layers without a weight matrix: L2 and up, on a borrowed L3 budget
UNIFORM_BITS = (1, 2, 4, 8)
MAX_BITS = 8


@dataclass
class ActnnConfig:
    name: str = "actnn"
    level: str = "L3"
    bits: float | None = None  # L1/L2: the uniform width (default 4); L3: the average budget (default 2)
    group_size: int = 256


def greedy_bits(cost: torch.Tensor, weight: torch.Tensor, target: int) -> torch.Tensor:
    """Widths b_i in 1..8 minimising sum_i cost_i / (2^b_i - 1)^2 subject to sum_i weight_i b_i <= target
    (int weights), by ActNN's greedy from 8 bits down; an int64 tensor on cost's device."""
    width = torch.arange(MAX_BITS, 1, -1, device=cost.device, dtype=torch.float64)  # before each decrement
    gain = ((2 ** (width - 1) - 1) ** -2 - (2**width - 1) ** -2).float()
    steps = (cost.float() / weight)[:, None] * gain  # [items, 7], increasing along each row
    order = steps.flatten().argsort(stable=True)
    removed = weight.repeat_interleave(MAX_BITS - 1)[order]
    need = weight.sum() * MAX_BITS - target
    taken = torch.empty_like(order, dtype=torch.bool).scatter_(0, order, removed.cumsum(0) - removed < need)
    return MAX_BITS - taken.view(-1, MAX_BITS - 1).sum(1)


def sample_range_sq(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """||R_n||^2: the sum over sample n's groups of (max - min)^2, fp32 [N]."""
    flat = x.detach().reshape(x.shape[0], -1)
    full = flat.shape[1] - flat.shape[1] % group_size
    groups = flat[:, :full].unflatten(1, (-1, group_size))
    r2 = (groups.amax(2) - groups.amin(2)).float().square().sum(1)  # amin + amax: ~25x aminmax on CPU
    if full < flat.shape[1]:
        tail = flat[:, full:]
        r2 += (tail.amax(1) - tail.amin(1)).float().square()
    return r2


class GroupCodec(Codec):
    """Uniform width: `compress.quantize` at `bits`."""

    def __init__(self, bits: int, group_size: int):
        self.bits, self.group_size = bits, group_size

    def pack(self, x: torch.Tensor) -> Packed:
        return compress.quantize(x, self.bits, self.group_size)


class _AdaptiveCodec(Codec):
    """L3: per-sample widths within this layer's budget. Conv/Linear layers (`locations` = k / (4 g))
    own a budget; a BatchNorm (`locations` None) borrows the one of the layer that ran before it."""

    def __init__(self, allocator: BitAllocator, locations: float | None):
        self.allocator, self.locations = allocator, locations
        self.budget = allocator.bits
        self.cost = self.grad_sq = None  # per-sample C_n without s; s (from the last backward)
        self.dim = self.borrowed = 0  # elements per sample: own input, BatchNorm inputs on this budget

    def pack(self, x: torch.Tensor) -> Packed:
        alloc, n = self.allocator, x.shape[0]
        r2 = sample_range_sq(x, alloc.group_size)
        if self.locations is None:
            owner = alloc.last_owner
            budget = alloc.bits if owner is None else owner.budget
            if owner is not None:
                owner.borrowed += x[0].numel()
        else:
            alloc.reallocate_if_stale()
            pixels = x[0].numel() // x.shape[1] if x.dim() > 1 else 1
            self.cost = r2 * (self.locations * alloc.group_size / pixels)
            self.dim, self.borrowed = x[0].numel(), 0
            alloc.last_owner, budget = self, self.budget
        bits = greedy_bits(r2, torch.ones(n, dtype=torch.int64, device=x.device), int(budget * n))
        return compress.quantize(x, bits, alloc.group_size)

    def state_dict(self) -> dict:
        """The statistics the next allocation reads (on the CPU: a checkpoint, or a gather across ranks)."""
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        return {"budget": self.budget, "cost": cpu(self.cost), "grad_sq": cpu(self.grad_sq), "dim": self.dim,
                "borrowed": self.borrowed, "stale": self.allocator.stale}

    def load_state_dict(self, state: dict) -> None:
        self.budget, self.cost, self.grad_sq = state["budget"], state["cost"], state["grad_sq"]
        self.dim, self.borrowed, self.allocator.stale = state["dim"], state["borrowed"], state["stale"]

    def observe(self, grad_output: torch.Tensor) -> None:
        if self.locations is not None:
            grad = grad_output.detach().reshape(grad_output.shape[0], -1)
            # a norm, not square().sum(): no squared copy of the gradient (196 MiB in resnet50 at batch 64)
            self.grad_sq = torch.linalg.vector_norm(grad, dim=1, dtype=torch.float32).square().mean()
            self.allocator.stale = True


class BitAllocator:
    """L3's per-layer budgets, shared by the codecs of one model (see the module doc)."""

    def __init__(self, bits: float, group_size: int):
        self.bits, self.group_size = bits, group_size
        self.owners: list[_AdaptiveCodec] = []  # Conv/Linear codecs
        self.last_owner: _AdaptiveCodec | None = None
        self.stale = False  # a backward has run since the last allocation

    def codec(self, module: nn.Module) -> _AdaptiveCodec:
        if type(module) in BORROWERS:
            return _AdaptiveCodec(self, None)
        kernel = getattr(module, "kernel_size", (1,))
        codec = _AdaptiveCodec(self, math.prod(kernel) / 4 / getattr(module, "groups", 1))
        self.owners.append(codec)
        return codec

    def reallocate_if_stale(self) -> None:
        """Joint greedy over every (layer, sample) pair, each weighing the elements its width covers."""
        ready = [c for c in self.owners if c.grad_sq is not None and c.cost is not None]
        if not (self.stale and ready):
            return
        self.stale = False
        sizes = [len(c.cost) for c in ready]
        cost = torch.cat([c.cost * c.grad_sq for c in ready])
        weight = torch.cat([torch.full((n,), c.dim + c.borrowed, device=cost.device) for n, c in zip(sizes, ready)])
        total = sum(n * (c.dim + c.borrowed) for n, c in zip(sizes, ready))
        bits = greedy_bits(cost, weight, int(self.bits * total))
        budgets = torch.stack([b.float().mean() for b in bits.split(sizes)]).tolist()  # one sync per step
        for c, budget in zip(ready, budgets):
            c.budget = budget


def width(cfg) -> float | None:
    """The bits a level works with (None at L0), after refusing settings it cannot take."""
    if cfg.level not in LEVELS:
        raise ConfigError(f"strategy.level={cfg.level!r}: actnn's levels are {', '.join(LEVELS)} (L3.1/L4/L5/swap "
                          "are the official memory-system tricks on top of L3 and are not offered).")
    if cfg.group_size < 8 or cfg.group_size % 8:
        raise ConfigError(f"strategy.group_size={cfg.group_size}: use a positive multiple of 8 (the paper's is 256).")
    if cfg.level == "L0":
        if cfg.bits is not None:
            raise ConfigError("strategy.bits: actnn level L0 quantizes nothing, so bits does not apply; use L1..L3.")
        return None
    if cfg.level == "L3":
        bits = 2.0 if cfg.bits is None else float(cfg.bits)
        if not 1 <= bits <= MAX_BITS:
            raise ConfigError(f"strategy.bits={cfg.bits:g}: at L3 it is the average budget; use 1..8 (default 2).")
        return bits
    bits = 4 if cfg.bits is None else cfg.bits
    if bits not in UNIFORM_BITS:
        raise ConfigError(f"strategy.bits={cfg.bits:g}: at {cfg.level} it is a uniform width; use one of "
                          f"{', '.join(map(str, UNIFORM_BITS))} (or strategy.level=L3 for an average budget).")
    return int(bits)


@STRATEGIES.register("actnn", schema=ActnnConfig, check=width)
def apply_actnn(model: nn.Module, cfg) -> nn.Module:
    level, bits = cfg.level, width(cfg)
    allocator = BitAllocator(bits, cfg.group_size) if level == "L3" else None

    def codec_for(name, module):
        if level == "L0" or (level == "L1" and type(module) in BORROWERS):
            return None
        return allocator.codec(module) if allocator else GroupCodec(bits, cfg.group_size)

    if not swap_layers(model, codec_for):
        raise StrategyError(f"actnn found nothing to compress in {type(model).__name__}: it needs "
                            "nn.Conv*/BatchNorm*/Linear/ReLU/Dropout/MaxPool2d modules (not functional "
                            "calls or subclasses). Use strategy=checkpoint for such a model.")
    return model
