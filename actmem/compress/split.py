"""DIVISION's low/high-frequency split (Wang et al., arXiv 2208.04187; official code
guanchuwang/division, fdmp/fdmp.py `FDMP_.fdmp` / `de_fdmp`), layout "split".

An activation is kept as its low-frequency part, block means in bf16, plus its high-frequency part,
the residual, quantized at a few bits per (sample, channel):
    lfc = avg_pool2d(x, k, stride=k)  (bf16);   hfc = x - nearest_upsample(lfc_bf16, size=(H, W))
    decode = upsample(lfc) + dequant(hfc)
Geometry, as in the official code:
- window k = B along a dim of size >= B, else the whole dim (global pool when H < B or W < B; the
  official code takes min(B, H) for both dims, the same thing on square maps);
- H or W not divisible by k: the official floor-mode pooling, i.e. the last H % k rows (W % k
  columns) belong to no block, and the nearest upsampling back to H x W uses torch's rule
  `src = min(floor(dst * fl32(Hp / H)), Hp - 1)`, which for such sizes does not line blocks up with
  their pixels (28x28 at B = 8: 3x3 means; rows 8 and 9, in block 1, read mean row 0). The
  reconstruction stays exact up to the hfc step; only the hfc range grows a little;
- input [N, C, H, W]; [N, A, L] (Conv1d, or a Linear's [N, T, F]) is taken as [N, A, 1, L] and
  [N, F] as [N, 1, 1, F]: the last dim is pooled in blocks of B and each row gets its own min/step,
  as the official `fdmp1d` does for a Linear input. Planes of a single element (H·W = 1) are
  stored, but take more bytes than the input (bf16 lfc + min/step): the official code keeps 4-D
  inputs with H = 1 uncompressed, and a strategy should skip at least these.
hfc quantization: min and step per (sample, channel) stored in bf16, as the official code stores
them; here the min is rounded down and the step up to bf16 before quantizing, so dequantization uses
the very numbers quantization did (the official code quantizes with fp32 ones and decodes with their
bf16 roundings, a small bias). Stochastic rounding `floor((hfc - min) / step + u)`, u ~ U[0, 1), is
unbiased; `stochastic=False` rounds to nearest. Arithmetic in fp32 (an fp64 input is rounded to fp32
first); the block sums in fp64, which makes them exact for all but extreme data and so the same in
both backends. NaN or Inf in the input raise NonFiniteError.

Packed: codes, meta = (lfc bf16 [P, Hp, Wp], stats bf16 [P, 2] = (min, step)); P = planes. Each
plane's H·W codes are packed from a byte boundary, bits * ceil(H·W / 8) bytes (7x7: 56 code slots
for 49 values), because one Triton program quantizes one plane (its min/step need all of it) and two
programs must not write the same byte; the torch reference, too, packs each slab of whole planes
straight into its bytes of the output.
"""
from __future__ import annotations

import torch

from actmem.compress import triton_split
from actmem.compress.backend import dispatch
from actmem.compress.errors import CompressError, NonFiniteError
from actmem.compress.packed import Packed, register_layout
from actmem.compress.packing import check_bits, pack_into_, unpack_into_
from actmem.compress.quant import SLAB


def split_geometry(shape: torch.Size, block: int) -> tuple[int, int, int, int, int]:
    """(P, H, W, kh, kw): the input as P planes of H x W, pooled in kh x kw windows."""
    if len(shape) == 4:
        P, H, W = shape[0] * shape[1], shape[2], shape[3]
    elif len(shape) == 3:
        P, H, W = shape[0] * shape[1], 1, shape[2]
    elif len(shape) == 2:
        P, H, W = shape[0], 1, shape[1]
    else:
        raise CompressError(f"split_quantize takes 2-D, 3-D or 4-D input ([N, F], [N, C, L], [N, C, H, W]), "
                            f"got shape {tuple(shape)}.")
    return P, H, W, max(1, min(block, H)), max(1, min(block, W))


def _bf16_down(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> the largest bf16 <= v, by clearing (or, below 0, carrying) the low 16 bits."""
    i = v.view(torch.int32)
    i = torch.where(i < 0, (i + 0xFFFF) & -65536, i & -65536)
    return i.view(torch.float32).bfloat16()


def nearest_scale(in_size: int, out_size: int) -> float:
    """torch's nearest-upsampling scale, in_size / out_size rounded to fp32."""
    return float(torch.tensor(in_size, dtype=torch.float32) / out_size)


def _nearest_index(in_size: int, out_size: int, device) -> torch.Tensor:
    """Source index of each output index under torch's rule (F.interpolate(mode="nearest"), the
    official F.upsample_nearest): min(floor(dst * scale), in_size - 1), in fp32."""
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    return dst.mul_(nearest_scale(in_size, out_size)).floor_().clamp_max_(in_size - 1).long()


def _upsample_index(geometry, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Source row of every output row, source column of every output column."""
    P, H, W, kh, kw = geometry
    return _nearest_index(H // kh, H, device), _nearest_index(W // kw, W, device)


def _upsampled(lfc: torch.Tensor, index) -> torch.Tensor:
    """nearest_upsample(lfc) in fp32, columns first (the row gather then copies whole rows)."""
    rows, cols = index
    return lfc.float().index_select(2, cols).index_select(1, rows)


def _scales(geometry) -> tuple[float, float]:
    P, H, W, kh, kw = geometry
    return nearest_scale(H // kh, H), nearest_scale(W // kw, W)


def _compress_slab(xs, geometry, index, levels, stochastic, gen):
    """lfc, stats and the codes (fp32, integral after truncation) of a slab of planes [R, H, W]."""
    P, H, W, kh, kw = geometry
    R, Hp, Wp = xs.shape[0], H // kh, W // kw
    xs = xs.float()  # (fp32 input: no copy)
    blocks = xs[:, : Hp * kh, : Wp * kw].reshape(R, Hp, kh, Wp, kw)
    lfc = blocks.sum((2, 4), dtype=torch.float64).div_(kh * kw).float().bfloat16()
    up = _upsampled(lfc, index)
    hfc = torch.sub(xs, up, out=up).view(R, H * W)
    lo, hi = hfc.amin(1), hfc.amax(1)  # NaN propagates (3x faster than aminmax here)
    mn = _bf16_down(lo)
    step = -_bf16_down(-(hi - mn.float()) * (1.0 / levels))
    m, st = mn.float()[:, None], step.float()[:, None]
    t = hfc.sub_(m).mul_(torch.where(st > 0, 1.0 / st, 0.0))
    t += torch.rand(t.shape, generator=gen, device=t.device) if stochastic else 0.5
    return t.clamp_(0, levels), lfc, torch.stack([mn, step], 1)


def _compress_triton(x, geometry, bits, stochastic, seed):
    P, H, W, kh, kw = geometry
    lfc = torch.empty((P, H // kh, W // kw), dtype=torch.bfloat16, device=x.device)
    stats = torch.zeros((P, 2), dtype=torch.bfloat16, device=x.device)
    codes = torch.empty(P * bits * -(-H * W // 8), dtype=torch.uint8, device=x.device)
    if x.numel():
        if stochastic and seed is None:
            seed = int(torch.randint(2**31 - 1, ()))
        triton_split.compress(x.contiguous(), lfc, stats, codes, seed or 0, geometry, _scales(geometry), bits,
                              stochastic)
    return codes, lfc, stats


def _compress_reference(x, geometry, bits, stochastic, seed):
    """Slabs of about SLAB elements, so that the fp32/fp64 temporaries stay in cache and nothing but the
    output is as large as x: each slab's codes are packed straight into their bytes of the output."""
    P, H, W, kh, kw = geometry
    xv = x.reshape(P, H, W)
    lfc = torch.empty((P, H // kh, W // kw), dtype=torch.bfloat16, device=x.device)
    stats = torch.empty((P, 2), dtype=torch.bfloat16, device=x.device)
    plane = bits * -(-H * W // 8)  # packed bytes per plane
    codes = torch.empty(P * plane, dtype=torch.uint8, device=x.device)
    gen = None if seed is None else torch.Generator(x.device).manual_seed(seed)  # None: the global RNG
    index = _upsample_index(geometry, x.device)
    rows = max(1, SLAB // (H * W))
    for r in range(0, P, rows):
        s = slice(r, r + rows)
        q, lfc[s], stats[s] = _compress_slab(xv[s], geometry, index, (1 << bits) - 1, stochastic, gen)
        blocks = q.new_zeros(q.shape[0], -(-H * W // 8) * 8, dtype=torch.uint8)  # planes padded to 8
        blocks[:, : H * W] = q
        pack_into_(blocks.view(-1, 8), bits, codes[r * plane : (r + q.shape[0]) * plane])
    return codes, lfc, stats


def split_quantize(x: torch.Tensor, block: int = 8, bits: int = 2, stochastic: bool = True,
                   seed: int | None = None) -> Packed:
    """DIVISION's compressed copy of x (see the module doc). seed: for the stochastic rounding
    (torch.Generator in the reference, Philox in Triton); None draws from torch's global RNG."""
    bits = check_bits(bits)
    if int(block) < 1:
        raise CompressError(f"split_quantize: block={block} must be a positive window size (DIVISION uses 8).")
    if not x.is_floating_point():
        raise CompressError(f"split_quantize takes a floating-point tensor, got {x.dtype}.")
    geometry = split_geometry(x.shape, int(block))
    P = geometry[0]
    args = (x, geometry, bits, stochastic, seed)
    # an empty x has nothing to launch or loop over: the kernel path's allocation is the whole answer
    codes, lfc, stats = dispatch(x, _compress_triton, _compress_reference, *args) if x.numel() else \
        _compress_triton(*args)
    if not torch.isfinite(stats).all():
        bad = int((~torch.isfinite(stats)).any(1).sum())
        raise NonFiniteError(f"split_quantize: the input holds NaN, Inf or values too large to quantize ({bad} "
                             f"of its {P} planes); the forward pass has diverged: lower the learning rate or "
                             "check the data.")
    return Packed(codes, (lfc, stats), x.shape, x.dtype, bits, "split", {"block": int(block)})


@register_layout("split")
def split_dequantize(p: Packed) -> torch.Tensor:
    """upsample(lfc) + dequant(hfc): shape, dtype and device of the input."""
    args = (p, split_geometry(p.shape, p.params["block"]))
    return dispatch(p.codes, _decompress_triton, _decompress_reference, *args) if p.shape.numel() else \
        _decompress_triton(*args)


def _decompress_triton(p: Packed, geometry) -> torch.Tensor:
    out = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    if out.numel():
        triton_split.decompress(p.codes, *p.meta, out, geometry, _scales(geometry), p.bits)
    return out


def _decompress_reference(p: Packed, geometry) -> torch.Tensor:
    """Slab by slab, each slab's codes unpacked from their bytes of p.codes."""
    P, H, W, kh, kw = geometry
    lfc, stats = p.meta
    mn, step = stats.float().unbind(1)
    out = torch.empty((P, H, W), dtype=p.dtype, device=p.device)
    index = _upsample_index(geometry, p.device)
    plane = p.bits * -(-H * W // 8)  # packed bytes per plane
    rows = max(1, SLAB // (H * W))
    for r in range(0, P, rows):
        s = slice(r, r + rows)
        packed = p.codes[r * plane : (r + rows) * plane]
        blocks = packed.new_empty(packed.numel() // p.bits, 8)
        q = unpack_into_(packed, p.bits, blocks).view(-1, -(-H * W // 8) * 8)[:, : H * W]
        hfc = torch.mul(q, step[s, None]).add_(mn[s, None])
        out[s] = hfc.view(-1, H, W).add_(_upsampled(lfc[s], index))
    return out.view(p.shape)
