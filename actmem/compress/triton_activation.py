"""Fused Triton kernel for nested forward-AD: one pass over x gives y = σ(x) and σ'(x) together (read
x once, write both), computed in fp32 and stored in x's dtype. For GELU (erf and tanh forms), SiLU and
Mish; forward_ad falls back to torch.func.jvp for every other activation and off the GPU."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from actmem.compress.launch import launch
from actmem.compress.triton_tiles import cast_rne

KINDS = ("gelu", "gelu_tanh", "silu", "mish")
BLOCK = 1024


@triton.jit
def _tanh(u):
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _value_and_derivative_kernel(x_ptr, y_ptr, d_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if KIND == 0:  # gelu: x Φ(x);  Φ(x) + x φ(x)
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        y = x * cdf
        d = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif KIND == 1:  # gelu_tanh: x/2 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x³)
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        y = 0.5 * x * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif KIND == 2:  # silu: x s(x);  s (1 + x (1 - s))
        s = tl.sigmoid(x)
        y = x * s
        d = s * (1.0 + x * (1.0 - s))
    else:  # mish: x tanh(softplus(x)) (softplus threshold 20, as torch);  t + x (1 - t²) s(x)
        sp = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))
        t = _tanh(sp)
        y = x * t
        d = t + x * (1.0 - t * t) * tl.sigmoid(x)
    tl.store(y_ptr + offs, cast_rne(y, y_ptr.dtype.element_ty), mask=mask)
    tl.store(d_ptr + offs, cast_rne(d, d_ptr.dtype.element_ty), mask=mask)


def value_and_derivative(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ(x), σ'(x)) for σ named by `kind` (one of KINDS), same shape and dtype as x."""
    x = x.contiguous()
    y, d = torch.empty_like(x), torch.empty_like(x)
    n = x.numel()
    launch(_value_and_derivative_kernel, (triton.cdiv(n, BLOCK),), x, y, d, n, KINDS.index(kind), BLOCK)
    return y, d
