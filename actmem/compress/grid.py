"""BLPA's fixed-grid quantization (Chakrabarti & Moseley 2019; official code ayanc/blpa, blpa/quant.py
and ops/quant.cu.cc), layout "grid".

For a BatchNorm -> ReLU -> Conv sequence BLPA keeps, per element, a K-bit code of
`u = x * scale[c] + offset[c]` (the strategy passes scale = 1/std, offset = -mean/std + beta/gamma,
so u = x_hat + beta/gamma, and ReLU(BN(x)) = gamma * ReLU(u) for gamma > 0) on a grid of fixed step
Delta = 6 / 2**K in batch-std units, with u = 0 a bin edge, so that the ReLU mask comes back exactly.

As in the official code: per channel `shift = max(1, 2**(K-1) - floor(center / Delta))` (center =
beta/gamma, the official `bias` argument; it centres the grid on the channel's mean), and the decoded
value is the bin midpoint `(code - shift + 0.5) * Delta`, in u units; `code >= shift` is the mask.
Two departures, both for an exact mask:
- the official code is `clip(floor((u - 1e-6) / Delta) + shift)`, whose bins [k*Delta + 1e-6, ...)
  put 0 < u < 1e-6 below the edge; here `clip(ceil(u / Delta) - 1 + shift)` uses the bins
  (k*Delta, (k+1)*Delta], so code >= shift exactly when u > 0 (u = 0 included). Codes differ from
  the official ones only for u within 1e-6 of a bin edge.
- shift is also clipped to at most 2**K - 1 (the official one is not, and is then stored in a uint8):
  with one bin on each side of 0 always present, clipping never crosses the edge, so the mask is
  exact for every u, however far beta/gamma sits from 0.
Deterministic (round down to the bin). x must be finite: NaN gets an unspecified code. bits = 1..8
(BLPA uses 4 and 8); at most 2 bits the step exceeds 1, and `u * (1 / Delta)` of a tiny positive
u can underflow to 0, which both backends catch by hand.

Packed: codes (bits * ceil(numel / 8) bytes) and the per-channel shift (uint8 [C]).
"""
from __future__ import annotations

import torch

from actmem.compress import triton_grid
from actmem.compress.backend import dispatch
from actmem.compress.errors import CompressError
from actmem.compress.packed import Packed, register_layout
from actmem.compress.packing import check_bits, pack_blocks_, packed_numel, unpack_codes
from actmem.compress.quant import SLAB


def grid_step(bits: int) -> float:
    """Delta = 6 / 2**bits (exact in fp32)."""
    return 6.0 / (1 << bits)


def _inv_step(bits: int) -> float:
    """1 / Delta rounded to fp32, so both backends multiply by the same number."""
    return float(torch.tensor((1 << bits) / 6.0, dtype=torch.float32))


def grid_shift(center: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-channel code of the first bin above u = 0 (uint8), from center = beta/gamma."""
    levels = 1 << bits
    shift = levels // 2 - torch.floor(center.float() * _inv_step(bits))
    return shift.clamp_(1, levels - 1).to(torch.uint8)


def _channels_view(x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 2:
        raise CompressError(f"grid_quantize needs [N, C, ...] input, got shape {tuple(x.shape)}.")
    return x.reshape(x.shape[0], x.shape[1], x.shape[2:].numel())


def grid_quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                  center: torch.Tensor | None = None) -> Packed:
    """Codes of u = x * scale[c] + offset[c] on the fixed grid (see the module doc); u is computed in
    fp32 (x rounded to fp32 first, one rounding per operation), channel = dim 1 of x.

    center: per-channel beta/gamma that positions the grid (None: 0, i.e. shift = 2**(bits-1)).
    """
    bits = check_bits(bits)
    xv = _channels_view(x)
    C = xv.shape[1]
    if center is None:
        center = torch.zeros(C, device=x.device)
    for name, t in (("scale", scale), ("offset", offset), ("center", center)):
        if t.numel() != C:
            raise CompressError(f"grid_quantize: {name} has {t.numel()} values for {C} channels (dim 1 of x).")
    scale, offset = (t.to(device=x.device, dtype=torch.float32).reshape(C) for t in (scale, offset))
    shift = grid_shift(center.to(x.device).reshape(C), bits)
    codes = dispatch(x, _quantize_triton, _quantize_reference, xv, scale, offset, shift, bits, _inv_step(bits))
    return Packed(codes, (shift,), x.shape, x.dtype, bits, "grid")


def _rows(t: torch.Tensor, N: int) -> torch.Tensor:
    """Per-channel values [C] as a column over the N * C rows of [N * C, inner]."""
    return t.repeat(N)[:, None]


def _quantize_triton(xv, scale, offset, shift, bits, inv_step):
    codes = torch.empty(packed_numel(xv.numel(), bits), dtype=torch.uint8, device=xv.device)
    triton_grid.quantize(xv.contiguous(), scale.contiguous(), offset.contiguous(), shift, bits, inv_step, codes)
    return codes


def _quantize_reference(xv, scale, offset, shift, bits, inv_step):
    """Slabs of about SLAB elements, so that the fp32 temporaries stay in cache."""
    N, C, inner = xv.shape
    x2 = xv.reshape(N * C, inner)
    if x2.dtype == torch.float64:
        x2 = x2.float()
    scale, offset, below = _rows(scale, N), _rows(offset, N), _rows(shift.float() - 1, N)
    n = xv.numel()
    codes = torch.zeros(n + -n % 8, dtype=torch.uint8, device=xv.device)
    rows = max(1, SLAB // max(inner, 1))
    for r in range(0, N * C, rows):
        s = slice(r, r + rows)
        u = torch.mul(x2[s], scale[s]).add_(offset[s])  # fp32: bf16/fp16 x promote
        positive = u > 0 if inv_step < 1 else None
        t = u.mul_(inv_step)
        if positive is not None:  # a tiny u > 0 whose u / Delta underflows must still land above 0
            t = torch.where(positive, t.clamp_min(torch.finfo(torch.float32).tiny), t)
        codes[: n].view(N * C, inner)[s] = t.ceil_().add_(below[s]).clamp_(0, (1 << bits) - 1)
    return pack_blocks_(codes.view(-1, 8), bits)


def _decode(p: Packed, mask: bool) -> torch.Tensor:
    return dispatch(p.codes, _decode_triton, _decode_reference, p, mask)


def _decode_triton(p: Packed, mask: bool) -> torch.Tensor:
    out = torch.empty((p.shape[0], p.shape[1], p.shape[2:].numel()), device=p.device,
                      dtype=torch.uint8 if mask else p.dtype)
    triton_grid.decode(p.codes, *p.meta, p.bits, grid_step(p.bits), out, mask)
    return out.view(torch.bool).view(p.shape) if mask else out.view(p.shape)


def _decode_reference(p: Packed, mask: bool) -> torch.Tensor:
    N, C = p.shape[0], p.shape[1]
    inner = p.shape[2:].numel()
    (shift,) = p.meta
    q = unpack_codes(p.codes, p.bits, p.shape.numel()).view(N * C, inner)
    if mask:
        return (q >= _rows(shift, N)).view(p.shape)
    out = torch.empty(q.shape, dtype=p.dtype, device=p.device)
    middle = _rows(shift.float() - 0.5, N)  # (code - shift + 0.5) * Delta, exact in fp32
    rows = max(1, SLAB // max(inner, 1))
    for r in range(0, N * C, rows):
        s = slice(r, r + rows)
        out[s] = torch.sub(q[s], middle[s]).mul_(grid_step(p.bits))
    return out.view(p.shape)


@register_layout("grid")
def grid_dequantize(p: Packed) -> torch.Tensor:
    """u_hat: the bin midpoints, in u units (x_hat = u_hat - beta/gamma is the strategy's business)."""
    return _decode(p, mask=False)


def grid_positive(p: Packed) -> torch.Tensor:
    """The exact mask u > 0 (bool, x's shape), read off the codes: code >= shift."""
    return _decode(p, mask=True)
