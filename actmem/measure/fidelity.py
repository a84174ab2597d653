"""How close a strategy's parameter gradient is to exact training's, for the same weights and batch:
what tells an unbiased but noisy compression from a biased one."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from actmem import strategies
from actmem.measure import activation_bytes


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def step(model, x, y, seed: int) -> torch.Tensor:
    """The full parameter gradient of one cross-entropy backward, the strategy's randomness seeded."""
    model.zero_grad(set_to_none=False)
    torch.manual_seed(seed)
    F.cross_entropy(model(x), y).backward()
    return flat_grad(model)


def gradient_fidelity(model, x, y, cfg, seeds: int) -> dict:
    """Gradient statistics of strategy `cfg` against exact, for `model` (left untouched) on (x, y): one
    warm-up step (ActNN L3 allocates its bits from a gradient), then one backward per seed.
    - cos, cos_min: cosine similarity to exact's gradient, mean and min over seeds;
    - rel_var: E_s ||g_s - mean_s g||^2 / ||g_exact||^2, the spread over seeds (sample variance);
    - mean_err: ||mean_s g_s - g_exact|| / ||g_exact||; for an unbiased strategy about
      sqrt(rel_var / seeds), for a deterministic one its bias;
    - bytes: what the strategy keeps for backward (activation_bytes)."""
    g_exact = step(copy.deepcopy(model), x, y, 0)
    twin = strategies.apply(copy.deepcopy(model), cfg)
    step(twin, x, y, 0)
    grads = torch.stack([step(twin, x, y, 1 + s) for s in range(seeds)])
    norm2 = g_exact.square().sum()
    cos = F.cosine_similarity(grads, g_exact[None], dim=1)
    return {
        "cos": float(cos.mean()), "cos_min": float(cos.min()),
        "rel_var": float(grads.var(0).sum() / norm2) if seeds > 1 else float("nan"),
        "mean_err": float((grads.mean(0) - g_exact).norm() / norm2.sqrt()),
        "bytes": activation_bytes(twin, x),
    }
