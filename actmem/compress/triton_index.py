"""Triton kernels for index codes: bit packing of masks and argmax indices, and few-bit buckets
(bucketize a tensor among borders; multiply a gradient by the level of each code)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from actmem.compress.triton_tiles import cast_rne, launch_elementwise, load_packed, store_packed, tile_offsets


@triton.jit
def _pack_kernel(src_ptr, out_ptr, n, BITS: tl.constexpr, PLANES: tl.constexpr,
                 G: tl.constexpr):
    group, offs = tile_offsets(G)
    q = tl.load(src_ptr + offs, mask=offs < n, other=0).to(tl.int32)
    store_packed(out_ptr, group, offs, q, n, BITS, PLANES)


@triton.jit
def _unpack_kernel(codes_ptr, out_ptr, n, BITS: tl.constexpr, PLANES: tl.constexpr,
                   G: tl.constexpr):
    group, offs = tile_offsets(G)
    q = load_packed(codes_ptr, group, n, BITS, PLANES)
    tl.store(out_ptr + offs, q.to(tl.uint8), mask=offs < n)


@triton.jit
def _bucketize_kernel(x_ptr, borders_ptr, out_ptr, n, BITS: tl.constexpr,
                      PLANES: tl.constexpr, WIDE: tl.constexpr, G: tl.constexpr):
    group, offs = tile_offsets(G)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    x = x.to(tl.float64) if WIDE else x.to(tl.float32)
    # Binary search for the first border >= x (torch.bucketize, right=False): after BITS halvings
    # q = #{i : not (borders[i] >= x)}, which sends NaN past the last border as torch does.
    q = tl.zeros(x.shape, tl.int32)
    for level in tl.static_range(BITS):
        step = 1 << (BITS - 1 - level)
        border = tl.load(borders_ptr + q + (step - 1))
        q = tl.where(border >= x, q, q + step)
    store_packed(out_ptr, group, offs, q, n, BITS, PLANES)


@triton.jit
def _lookup_mul_kernel(codes_ptr, levels_ptr, grad_ptr, out_ptr, n, BITS: tl.constexpr,
                       PLANES: tl.constexpr, WIDE: tl.constexpr, G: tl.constexpr):
    group, offs = tile_offsets(G)
    q = load_packed(codes_ptr, group, n, BITS, PLANES)
    level = tl.load(levels_ptr + q)  # levels already in grad's dtype
    g = tl.load(grad_ptr + offs, mask=offs < n, other=0.0)
    # fp16/bf16 products are exact in fp32, so rounding once gives the product in grad's dtype.
    acc = tl.float64 if WIDE else tl.float32
    tl.store(out_ptr + offs, cast_rne(level.to(acc) * g.to(acc), g.dtype), mask=offs < n)


def pack(codes, bits, out):
    """Pack the flat integer (or uint8-viewed bool) codes into `out` (uint8, bits * ceil(n / 8))."""
    launch_elementwise(_pack_kernel, codes.numel(), bits, codes, out)


def unpack(codes, bits, out):
    """Unpack into `out` (flat uint8 of n codes)."""
    launch_elementwise(_unpack_kernel, out.numel(), bits, codes, out)


def bucketize(x, borders, bits, out):
    """Bucket indices of flat x among `borders` (2**bits - 1 sorted values, already in the dtype that
    x and the borders promote to), packed into `out`."""
    launch_elementwise(_bucketize_kernel, x.numel(), bits, x, borders, out, WIDE=borders.dtype == torch.float64)


def lookup_mul(codes, bits, levels, grad, out):
    """out = levels[code] * grad, elementwise over the flat grad (levels in grad's dtype)."""
    launch_elementwise(_lookup_mul_kernel, grad.numel(), bits, codes, levels, grad, out,
                       WIDE=grad.dtype == torch.float64)
