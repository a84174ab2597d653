"""Triton kernels for group quantization (quant.py): quantize+pack and unpack+dequantize, one kernel
each way.

A program takes ROWS groups as a [ROWS, BLOCK] tile (BLOCK = group_size rounded up to a power of two,
the extra columns masked off), so a group's min/max is a row reduction and its codes are packed in
registers: row r of sample n, group g writes its bytes at base(n) + g * group_size / 8 * width(n),
which with one width is simply r * group_size / 8 * width. The arithmetic is the reference's, in the
same order and with fp fusion off, so nearest-rounding codes, metadata and decoded values are
bit-identical to it; stochastic rounding draws u from Philox (`tl.rand(seed, element offset)`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from actmem.compress.launch import launch
from actmem.compress.triton_tiles import cast_rne, pack_tile, unpack_tile

# 4 elements a thread: 2048-element tiles needed up to 169 registers in the mixed-width quantizer (12 %
# occupancy on sm_90), 128 forced by maxnreg spilled; at 1024 it takes at most 80 (results/kernels-static.md).
TILE = 1024  # elements per program
WARPS = 8


@triton.jit
def _round_bf16(v, UP: tl.constexpr):
    """The bf16 value next to fp32 v, above it (UP) or below it, as fp32; v itself if it is bf16.
    Truncating the low 16 bits rounds toward zero; one bf16 ulp more magnitude rounds away from it."""
    i = v.to(tl.int32, bitcast=True)
    t = i & -65536
    away = (i != t) & ((v > 0) == UP)
    return tl.where(away, t + 65536, t).to(tl.float32, bitcast=True)


@triton.jit
def _round_f16_up(v):
    """The fp16 value at or above fp32 v >= 0 (capped at fp16's max), as fp32."""
    y = v.to(tl.float16)
    up = (y.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)
    y = tl.where(y.to(tl.float32) < v, up, y).to(tl.float32)
    return tl.minimum(y, 65504.0)


@triton.jit
def _tile(rows, numel, groups, GROUP: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """This program's rows [ROWS], their samples and groups, element offsets [ROWS, BLOCK] and mask."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    sample = row // groups
    col = tl.arange(0, BLOCK)
    pos = (row % groups)[:, None] * GROUP + col[None, :]  # index inside the sample
    valid = (row < rows)[:, None] & (col < GROUP)[None, :] & (pos < numel)
    return row, sample, sample[:, None] * numel + pos, valid


@triton.jit
def _widths(row, sample, rows, groups, width_ptr, base_ptr, GROUP: tl.constexpr, ROWS: tl.constexpr,
            BITS: tl.constexpr, MIXED: tl.constexpr):
    """Code width [ROWS] (int32) and byte offset [ROWS] of each row's packed codes."""
    if MIXED:
        width = tl.load(width_ptr + sample, mask=row < rows, other=1)
        base = tl.load(base_ptr + sample, mask=row < rows, other=0) + (row % groups) * (GROUP // 8) * width
    else:
        width = tl.full((ROWS,), BITS, tl.int32)
        base = row * (GROUP // 8 * BITS)
    return width, base


@triton.jit
def _byte_offsets(base, width, GROUP: tl.constexpr, BLOCK: tl.constexpr, PLANES: tl.constexpr,
                  ROWS: tl.constexpr):
    """Addresses [ROWS * BLOCK // 8, PLANES] of the packed bytes of the tile's blocks of 8, and their mask."""
    blk = tl.arange(0, BLOCK // 8)
    plane = tl.arange(0, PLANES)
    addr = base[:, None, None] + blk[None, :, None] * width[:, None, None] + plane[None, None, :]
    mask = (blk < GROUP // 8)[None, :, None] & (plane[None, None, :] < width[:, None, None])
    return tl.reshape(addr, (ROWS * BLOCK // 8, PLANES)), tl.reshape(mask, (ROWS * BLOCK // 8, PLANES))


# Seeds and counts used only in index arithmetic are not specialized: Triton would compile another kernel
# whenever one equals 1 or is a multiple of 16 (a random seed every 16th step), for no gain.
@triton.jit(do_not_specialize=["seed", "rows", "groups"])
def _group_quantize_kernel(x_ptr, lo_ptr, step_ptr, codes_ptr, width_ptr, base_ptr, seed, rows, numel, groups,
                     GROUP: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, BITS: tl.constexpr,
                     PLANES: tl.constexpr, MIXED: tl.constexpr, STOCHASTIC: tl.constexpr):
    row, sample, offs, valid = _tile(rows, numel, groups, GROUP, BLOCK, ROWS)
    width, base = _widths(row, sample, rows, groups, width_ptr, base_ptr, GROUP, ROWS, BITS, MIXED)
    levels = ((1 << width) - 1).to(tl.float32)

    live = row < rows
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    mn = tl.where(live, tl.min(tl.where(valid, x, float("inf")), axis=1), 0.0)
    mx = tl.where(live, tl.max(tl.where(valid, x, -float("inf")), axis=1), 0.0)
    bad = tl.max(tl.where(valid & (x - x != 0), 1, 0), axis=1) > 0  # NaN or Inf in the group

    if lo_ptr.dtype.element_ty == tl.float16:
        lo = mn  # fp16 input: its min is an fp16 value already
        step = _round_f16_up(tl.math.div_rn(mx - lo, levels))
    else:
        lo = _round_bf16(mn, False)
        step = tl.minimum(_round_bf16(tl.math.div_rn(mx - lo, levels), True), 3.3895313892515355e38)
    inv = tl.where(step > 0, tl.math.div_rn(1.0, tl.where(step > 0, step, 1.0)), 0.0)

    v = (x - lo[:, None]) * inv[:, None]
    if STOCHASTIC:
        v += tl.rand(seed, offs)
    else:
        v += 0.5
    q = tl.where(valid, tl.minimum(tl.floor(v), levels[:, None]), 0.0).to(tl.int32)

    tl.store(lo_ptr + row, lo.to(lo_ptr.dtype.element_ty), mask=live)
    tl.store(step_ptr + row, tl.where(bad, float("nan"), step).to(step_ptr.dtype.element_ty), mask=live)
    addr, mask = _byte_offsets(base, width, GROUP, BLOCK, PLANES, ROWS)
    packed = pack_tile(tl.reshape(q, (ROWS * BLOCK // 8, 8)), PLANES)
    live = tl.reshape(tl.broadcast_to(live[:, None], (ROWS, BLOCK // 8)), (ROWS * BLOCK // 8,))
    tl.store(codes_ptr + addr, packed.to(tl.uint8), mask=mask & live[:, None])


@triton.jit(do_not_specialize=["rows", "groups"])
def _group_dequantize_kernel(codes_ptr, lo_ptr, step_ptr, out_ptr, width_ptr, base_ptr, rows, numel, groups,
                       GROUP: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, BITS: tl.constexpr,
                       PLANES: tl.constexpr, MIXED: tl.constexpr):
    row, sample, offs, valid = _tile(rows, numel, groups, GROUP, BLOCK, ROWS)
    width, base = _widths(row, sample, rows, groups, width_ptr, base_ptr, GROUP, ROWS, BITS, MIXED)

    live = row < rows
    addr, mask = _byte_offsets(base, width, GROUP, BLOCK, PLANES, ROWS)
    live8 = tl.reshape(tl.broadcast_to(live[:, None], (ROWS, BLOCK // 8)), (ROWS * BLOCK // 8,))
    packed = tl.load(codes_ptr + addr, mask=mask & live8[:, None], other=0).to(tl.int32)
    q = tl.reshape(unpack_tile(packed, PLANES), (ROWS, BLOCK))

    lo = tl.load(lo_ptr + row, mask=live, other=0.0).to(tl.float32)
    step = tl.load(step_ptr + row, mask=live, other=0.0).to(tl.float32)
    x = q.to(tl.float32) * step[:, None] + lo[:, None]
    tl.store(out_ptr + offs, cast_rne(x, out_ptr.dtype.element_ty), mask=valid)


def _sample_offsets(widths: torch.Tensor, codes_per_sample: int) -> torch.Tensor:
    """Byte offset of each sample's packed codes when the samples are stored by ascending width
    (ties in sample order), the order of quant.py's reference."""
    order = torch.argsort(widths, stable=True)
    sizes = widths[order].long() * (codes_per_sample // 8)
    base = torch.empty_like(sizes)
    base[order] = torch.cumsum(sizes, 0) - sizes
    return base


def _launch(kernel, rows, group_size, widths, *args, **constexprs):
    """Run `kernel` over `rows` groups of `group_size`; widths: an int, or a per-sample tensor."""
    if not rows:
        return
    block = triton.next_power_of_2(group_size)
    tile_rows = max(1, TILE // block)
    # Mixed widths are read per row; the batch's widest code only sizes the packing tile, so it is rounded
    # to a power of two: at most 4 compiled variants however the widths move during training.
    planes = triton.next_power_of_2(widths if isinstance(widths, int) else int(widths.max()))
    launch(kernel, (triton.cdiv(rows, tile_rows),), *args, GROUP=group_size, BLOCK=block, ROWS=tile_rows,
           BITS=widths if isinstance(widths, int) else planes, PLANES=planes, MIXED=not isinstance(widths, int),
           enable_fp_fusion=False, num_warps=WARPS, **constexprs)


def _width_args(widths, groups, group_size, dummy):
    """The kernels' per-sample width and byte-offset tensors (placeholders when there is one width)."""
    if isinstance(widths, int):
        return dummy, dummy
    return widths.to(torch.int32), _sample_offsets(widths, groups * group_size)


def quantize(x2, widths, group_size, stochastic, seed, lo, step, codes):
    """Quantize x2 ([N, M], contiguous) into lo / step ([N, G], the metadata dtype) and the packed codes."""
    N, M = x2.shape
    G = lo.shape[1]
    width, base = _width_args(widths, G, group_size, lo)
    _launch(_group_quantize_kernel, N * G, group_size, widths, x2, lo, step, codes, width, base, seed or 0,
            N * G, M, G, STOCHASTIC=stochastic)


def dequantize(codes, lo, step, widths, group_size, out):
    """Decode into out ([N, M], contiguous) from the packed codes and lo / step ([N, G])."""
    N, M = out.shape
    G = lo.shape[1]
    width, base = _width_args(widths, G, group_size, lo)
    _launch(_group_dequantize_kernel, N * G, group_size, widths, codes, lo, step, out, width, base, N * G, M, G)
