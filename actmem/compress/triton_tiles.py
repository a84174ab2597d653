"""What the Triton kernels of this package share: the tile packers for the "bit planes of 8" layout of
packing.py, a rounding cast to bf16, and the launcher of element-wise kernels over groups of 8 codes.

A program handles G groups of 8 consecutive codes as a [G, 8] tile; group g becomes BITS bytes at
byte offset g * BITS, byte j holding bit j of code k at bit position k.
"""
from __future__ import annotations

import triton
import triton.language as tl

from actmem.compress.launch import launch

GROUPS = 256  # groups of 8 codes per program: 2048 elements
WARPS = 8  # 8 elements a thread, as the quantizer (results/kernels-static.md: registers and occupancy)


@triton.jit
def pack_tile(q, PLANES: tl.constexpr):
    """[G, 8] int32 codes -> [G, PLANES] int32 bytes (plane j: bit j of the 8 codes). One plane at a
    time: a [G, PLANES, 8] tile of bits would hold 8 * PLANES registers per code a thread packs."""
    planes = tl.arange(0, PLANES)
    shifts = tl.arange(0, 8)
    out = tl.zeros((q.shape[0], PLANES), tl.int32)
    for j in tl.static_range(PLANES):
        byte = tl.sum(((q >> j) & 1) << shifts[None, :], axis=1)
        out = tl.where(planes[None, :] == j, byte[:, None], out)
    return out


@triton.jit
def unpack_tile(b, PLANES: tl.constexpr):
    """[G, PLANES] int32 bytes (planes past the code width loaded as 0) -> [G, 8] int32 codes, one
    plane at a time (as pack_tile)."""
    planes = tl.arange(0, PLANES)
    shifts = tl.arange(0, 8)
    q = tl.zeros((b.shape[0], 8), tl.int32)
    for j in tl.static_range(PLANES):
        byte = tl.sum(tl.where(planes[None, :] == j, b, 0), axis=1)
        q = q | (((byte[:, None] >> shifts[None, :]) & 1) << j)
    return q


@triton.jit
def store_packed(out_ptr, group, offs, q, n, BITS: tl.constexpr, PLANES: tl.constexpr):
    """Store the [G, 8] codes q of elements `offs` (groups `group`, [G]) of n into the packed bytes
    at out_ptr; codes past n are written as 0, as packing.py pads."""
    planes = tl.arange(0, PLANES)
    q = tl.where(offs < n, q, 0)
    mask = (group * 8 < n)[:, None] & (planes < BITS)[None, :]
    tl.store(out_ptr + group[:, None] * BITS + planes[None, :], pack_tile(q, PLANES).to(tl.uint8), mask=mask)


@triton.jit
def load_packed(codes_ptr, group, n, BITS: tl.constexpr, PLANES: tl.constexpr):
    """The [G, 8] int32 codes of groups `group` ([G]) of n codes from the packed bytes at codes_ptr."""
    planes = tl.arange(0, PLANES)
    mask = (group * 8 < n)[:, None] & (planes < BITS)[None, :]
    b = tl.load(codes_ptr + group[:, None] * BITS + planes[None, :], mask=mask, other=0)
    return unpack_tile(b.to(tl.int32), PLANES)


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even. bf16 is rounded by hand: the Triton interpreter
    truncates in `.to(tl.bfloat16)`, the GPU rounds; the integer rounding here is the same on both."""
    if dtype == tl.bfloat16:
        i = x.to(tl.int32, bitcast=True)
        i = (i + (0x7FFF + ((i >> 16) & 1))) & -65536
        return i.to(tl.float32, bitcast=True).to(tl.bfloat16)
    return x.to(dtype)


@triton.jit
def tile_offsets(G: tl.constexpr):
    """This program's group indices [G] and element offsets [G, 8] (int64)."""
    group = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    return group, group[:, None] * 8 + tl.arange(0, 8)[None, :]


def launch_elementwise(kernel, n, bits, *args, **constexprs):
    """Run an elementwise kernel over n codes, GROUPS groups of 8 per program. fp fusion is off so
    that `a * b + c` rounds twice, as in the torch reference."""
    if n:
        launch(kernel, (triton.cdiv(n, 8 * GROUPS),), *args, n, BITS=bits, PLANES=triton.next_power_of_2(bits),
               G=GROUPS, enable_fp_fusion=False, num_warps=WARPS, **constexprs)
