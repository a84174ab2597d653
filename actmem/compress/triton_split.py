"""Triton kernels for DIVISION's low/high-frequency split (split.py has the definition and the torch
reference): one kernel compresses, one decompresses.

Compress runs one program per plane (one (sample, channel) of H x W), in three passes over it:
block means -> lfc (bf16); min/max of hfc = x - upsample(lfc); quantize + pack hfc. The second and
third passes read the lfc back from global memory after a barrier, and x again (from L2 for all but
the largest planes).
"""
from __future__ import annotations

import triton
import triton.language as tl

from actmem.compress.launch import launch
from actmem.compress.triton_tiles import cast_rne, load_packed, store_packed

GROUPS = 128  # groups of 8 codes per iteration: 1024 elements
POOL_TILE = 1024  # elements of x per block-mean iteration (2048 spill on sm_80 for [N, F] rows)


@triton.jit
def _upsampled(lfc_ptr, e, H, W, Hp, Wp, sh, sw):
    """nearest_upsample(lfc) at the plane offsets e (fp32), by torch's rule: the lfc pixel of (h, w)
    is (min(floor(h * sh), Hp - 1), ...), sh = Hp / H in fp32 (split.nearest_scale)."""
    h = tl.minimum(tl.floor((e // W).to(tl.float32) * sh).to(tl.int32), Hp - 1)
    w = tl.minimum(tl.floor((e % W).to(tl.float32) * sw).to(tl.int32), Wp - 1)
    return tl.load(lfc_ptr + h * Wp + w, mask=e < H * W, other=0.0).to(tl.float32)


@triton.jit
def _hfc(x_ptr, lfc_ptr, e, H, W, Hp, Wp, sh, sw):
    """x - nearest_upsample(lfc) at the plane offsets e (fp32)."""
    x = tl.load(x_ptr + e, mask=e < H * W, other=0.0).to(tl.float32)
    return x - _upsampled(lfc_ptr, e, H, W, Hp, Wp, sh, sw)


@triton.jit
def _bf16_down(v):
    """fp32 -> the largest bf16 <= v, returned as fp32 (same integer rounding as split._bf16_down)."""
    i = v.to(tl.int32, bitcast=True)
    i = tl.where(i < 0, (i + 0xFFFF) & -65536, i & -65536)
    return i.to(tl.float32, bitcast=True)


# Seeds and counts used only in index arithmetic are not specialized: Triton would compile another kernel
# whenever one equals 1 or is a multiple of 16 (a random seed every 16th step), for no gain.
@triton.jit(do_not_specialize=["seed", "kh", "kw", "Hp", "Wp"])
def _split_compress_kernel(x_ptr, lfc_ptr, stats_ptr, codes_ptr, seed, H, W, kh, kw, Hp, Wp, sh, sw,
                     BITS: tl.constexpr, PLANES: tl.constexpr, STOCHASTIC: tl.constexpr,
                     BH: tl.constexpr, BJ: tl.constexpr, BW: tl.constexpr, G: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    HW = H * W
    x_ptr += p * HW
    lfc_ptr += p * Hp * Wp

    # 1. lfc: block means, summed in fp64 (exact unless a block spans > 2^23 in magnitude), so the
    #    result does not depend on the summation order and matches the reference bit for bit.
    a = tl.arange(0, BH)[:, None, None]
    j = tl.arange(0, BJ)[None, :, None]
    b = tl.arange(0, BW)[None, None, :]
    for i in range(Hp):
        for j0 in range(0, Wp, BJ):
            m = (a < kh) & (j0 + j < Wp) & (b < kw)
            v = tl.load(x_ptr + (i * kh + a) * W + (j0 + j) * kw + b, mask=m, other=0.0)
            mean = (tl.sum(tl.sum(v.to(tl.float64), axis=2), axis=0) / (kh * kw)).to(tl.float32)
            jj = j0 + tl.arange(0, BJ)
            tl.store(lfc_ptr + i * Wp + jj, cast_rne(mean, tl.bfloat16), mask=jj < Wp)
    tl.debug_barrier()

    # 2. range of hfc
    tile = tl.arange(0, G)[:, None] * 8 + tl.arange(0, 8)[None, :]
    lo = tl.full((G, 8), float("inf"), tl.float32)
    hi = tl.full((G, 8), float("-inf"), tl.float32)
    nans = tl.zeros((G, 8), tl.int32)
    for e0 in range(0, HW, 8 * G):
        e = e0 + tile
        hf = _hfc(x_ptr, lfc_ptr, e, H, W, Hp, Wp, sh, sw)
        lo = tl.minimum(lo, tl.where(e < HW, hf, float("inf")))
        hi = tl.maximum(hi, tl.where(e < HW, hf, float("-inf")))
        nans += (hf != hf).to(tl.int32)
    mn = _bf16_down(tl.min(tl.min(lo, axis=1), axis=0))
    step = -_bf16_down(-(tl.max(tl.max(hi, axis=1), axis=0) - mn) * (1.0 / ((1 << BITS) - 1)))
    mn = tl.where(tl.sum(tl.sum(nans, axis=1), axis=0) > 0, float("nan"), mn)  # flagged on the host
    tl.store(stats_ptr + 2 * p, mn.to(tl.bfloat16))  # exact: both hold bf16 values
    tl.store(stats_ptr + 2 * p + 1, step.to(tl.bfloat16))
    inv = tl.where(step > 0, tl.math.div_rn(1.0, tl.where(step > 0, step, 1.0)), 0.0)

    # 3. quantize hfc per plane and pack; a plane's codes start on a byte boundary
    codes_ptr += p * (BITS * tl.cdiv(HW, 8))
    for e0 in range(0, HW, 8 * G):
        group = e0 // 8 + tl.arange(0, G)
        e = e0 + tile
        t = (_hfc(x_ptr, lfc_ptr, e, H, W, Hp, Wp, sh, sw) - mn) * inv
        if STOCHASTIC:
            t += tl.rand(seed, p * (8 * tl.cdiv(HW, 8)) + e)
        else:
            t += 0.5
        q = tl.minimum(tl.maximum(tl.floor(t), 0.0), (1 << BITS) - 1.0).to(tl.int32)
        store_packed(codes_ptr, group, e, q, HW, BITS, PLANES)


@triton.jit(do_not_specialize=["Hp", "Wp"])
def _split_decompress_kernel(codes_ptr, lfc_ptr, stats_ptr, out_ptr, H, W, Hp, Wp, sh, sw,
                       BITS: tl.constexpr, PLANES: tl.constexpr, G: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    HW = H * W
    group = tl.program_id(1) * G + tl.arange(0, G)
    e = group[:, None] * 8 + tl.arange(0, 8)[None, :]
    q = load_packed(codes_ptr + p * (BITS * tl.cdiv(HW, 8)), group, HW, BITS, PLANES)
    mn = tl.load(stats_ptr + 2 * p).to(tl.float32)
    step = tl.load(stats_ptr + 2 * p + 1).to(tl.float32)
    low = _upsampled(lfc_ptr + p * Hp * Wp, e, H, W, Hp, Wp, sh, sw)
    v = low + (mn + q.to(tl.float32) * step)
    tl.store(out_ptr + p * HW + e, cast_rne(v, out_ptr.dtype.element_ty), mask=e < HW)


def compress(x, lfc, stats, codes, seed, geometry, scales, bits, stochastic):
    """x: contiguous, P planes of H x W; fills lfc (bf16 [P, Hp, Wp]), stats (bf16 [P, 2]), codes.
    scales: torch's nearest-upsampling scales (Hp / H, Wp / W) in fp32."""
    P, H, W, kh, kw = geometry
    sh, sw = scales
    Hp, Wp = H // kh, W // kw
    BH, BW = triton.next_power_of_2(kh), triton.next_power_of_2(kw)
    BJ = max(1, min(triton.next_power_of_2(Wp), POOL_TILE // (BH * BW)))
    launch(_split_compress_kernel, (P,), x, lfc, stats, codes, seed, H, W, kh, kw, Hp, Wp, sh, sw, BITS=bits,
           PLANES=triton.next_power_of_2(bits), STOCHASTIC=stochastic, BH=BH, BJ=BJ, BW=BW, G=GROUPS,
           enable_fp_fusion=False)


def decompress(codes, lfc, stats, out, geometry, scales, bits):
    """Fill out (P planes of H x W, the original dtype) with upsample(lfc) + dequant(hfc)."""
    P, H, W, kh, kw = geometry
    grid = (P, triton.cdiv(H * W, 8 * GROUPS))
    launch(_split_decompress_kernel, grid, codes, lfc, stats, out, H, W, H // kh, W // kw, *scales, BITS=bits,
           PLANES=triton.next_power_of_2(bits), G=GROUPS, enable_fp_fusion=False)
