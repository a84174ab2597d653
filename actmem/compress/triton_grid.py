"""Triton kernels for BLPA's fixed grid (grid.py has the definition and the torch reference).

`launch_elementwise` turns fp fusion off: `u = x * scale + offset` must round twice, as in torch, or a fused
multiply-add would move values across bin edges (and across u = 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from actmem.compress.triton_tiles import cast_rne, launch_elementwise, load_packed, store_packed, tile_offsets


# Seeds and counts used only in index arithmetic are not specialized: Triton would compile another kernel
# whenever one equals 1 or is a multiple of 16 (a random seed every 16th step), for no gain.
@triton.jit(do_not_specialize=["C", "inner"])
def _grid_quantize_kernel(x_ptr, scale_ptr, offset_ptr, shift_ptr, out_ptr, C, inner, inv_delta, n,
                     BITS: tl.constexpr, PLANES: tl.constexpr, G: tl.constexpr):
    group, offs = tile_offsets(G)
    c = (offs // inner) % C
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    u = x * tl.load(scale_ptr + c) + tl.load(offset_ptr + c)
    t = u * inv_delta
    # a u > 0 whose t underflowed to 0 (bits <= 2: 1 / Delta < 1) must still land above 0
    t = tl.where(u > 0, tl.maximum(t, 1.1754943508222875e-38), t)
    q = tl.math.ceil(t) - 1.0 + tl.load(shift_ptr + c).to(tl.float32)
    q = tl.minimum(tl.maximum(q, 0.0), (1 << BITS) - 1.0).to(tl.int32)
    store_packed(out_ptr, group, offs, q, n, BITS, PLANES)


@triton.jit(do_not_specialize=["C", "inner"])
def _grid_decode_kernel(codes_ptr, shift_ptr, out_ptr, C, inner, delta, n, MASK: tl.constexpr,
                   BITS: tl.constexpr, PLANES: tl.constexpr, G: tl.constexpr):
    group, offs = tile_offsets(G)
    q = load_packed(codes_ptr, group, n, BITS, PLANES)
    shift = tl.load(shift_ptr + (offs // inner) % C).to(tl.int32)
    if MASK:
        tl.store(out_ptr + offs, (q >= shift).to(tl.uint8), mask=offs < n)
    else:
        u = ((q - shift).to(tl.float32) + 0.5) * delta
        tl.store(out_ptr + offs, cast_rne(u, out_ptr.dtype.element_ty), mask=offs < n)


def quantize(x, scale, offset, shift, bits, inv_delta, out):
    """Codes of the contiguous x ([N, C, inner]) packed into `out`; scale/offset fp32, shift uint8."""
    launch_elementwise(_grid_quantize_kernel, x.numel(), bits, x, scale, offset, shift, out, x.shape[1], x.shape[2],
                       inv_delta)


def decode(codes, shift, bits, delta, out: torch.Tensor, mask: bool):
    """Bin midpoints (mask=False) or the code >= shift mask (mask=True, out viewed as uint8)."""
    N, C, inner = out.shape
    launch_elementwise(_grid_decode_kernel, out.numel(), bits, codes, shift, out, C, inner, delta, MASK=mask)
