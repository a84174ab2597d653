"""Group quantization (ActNN): per-group min and step, b-bit codes packed densely ("group" layout).

Each sample's values (C*H*W of x[n]; the whole flattened tensor when per_sample=False) are cut into
groups of `group_size`. The last group of a sample is padded with the sample's last value, which is
in that group already, so padding never widens a range (its codes are stored as 0). Per group:

    lo   = min(x), rounded *down* to the metadata dtype (bf16 for fp32/bf16 input, fp16 for fp16)
    step = (max(x) - lo) / (2^b - 1), rounded *up* to it
    q    = min(floor((x - lo) / step + u), 2^b - 1)     u ~ U[0, 1) (stochastic) or u = 1/2 (nearest)
    x_hat = lo + q * step

The codes are computed from the *stored* lo and step, so they mean what dequantize reads. Rounding lo
down and step up keeps the stored grid over [min, max]: q never leaves [0, 2^b - 1] but through
float32 rounding at the top end (which the clamp catches), and stochastic rounding stays unbiased,
E[x_hat] = x. The price: |x - x_hat| < step (<= step / 2 for nearest) with step at most
(max - lo) / (2^b - 1) times 1 + 2^-7 (bf16 keeps 8 significant bits; fp16 11). A constant group has
step = 0 and decodes exactly whenever its value fits the metadata dtype (always for fp16/bf16 input;
zeros, as after a ReLU, for fp32). ActNN stores scale = 1 / step; the step is stored here because
1 / step overflows fp16 (65504) for groups narrower than 2^b / 65504. (The one case left out: an fp16
step is capped at 65504, so a 1-bit fp16 group spanning more than that is clamped at its top.)

The torch reference works through the groups in slabs of SLAB elements so that its float32
temporaries stay in cache, and so that nothing but the output is as large as the input: a slab of
padded groups is copied from x on its own, and each slab's codes are packed straight into their
bytes of the output (and decoded from there). It draws u on a 2^-16 lattice, (r + 1/2) / 2^16 with
r 16 random bits of a torch.Generator: the mean is exactly 1/2, the bias of a rounding at most 2^-17
of a step, at a quarter of the generator calls of torch.rand (the generator is serial on CPU). The
Triton kernels (triton_quant.py) use Philox's float32 `tl.rand`.

Per-sample widths (ActNN's mixed precision): `bits` may be a 1-D tensor, one width 1..8 per sample;
the samples' codes are then stored by ascending width (ties in sample order), each densely at its
own width, and the widths (uint8, N bytes) join the metadata.
"""
from __future__ import annotations

import math

import torch

from actmem.compress import triton_quant
from actmem.compress.backend import dispatch
from actmem.compress.errors import CompressError, NonFiniteError
from actmem.compress.packed import Packed, decode, register_layout
from actmem.compress.packing import planes, transpose_blocks_

WIDTHS = (1, 2, 4, 8)
SLAB = 1 << 18  # elements per step of the reference: each float32 temporary is 1 MiB
_META = {torch.float32: torch.bfloat16, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}


def quantize(x: torch.Tensor, bits, group_size: int = 256, stochastic: bool = True, per_sample: bool = True,
             seed: int | None = None, check: bool = True) -> Packed:
    """Quantize x to `bits` bits per value (1, 2, 4 or 8; or a 1-D tensor of per-sample widths 1..8)
    in groups of `group_size` values. `seed` fixes the stochastic rounding (default: drawn from
    torch's global RNG, so torch.manual_seed reproduces a run). `check` raises NonFiniteError on NaN/Inf
    input; it costs one reduction over the per-group steps (and a sync on GPU)."""
    if x.dtype not in _META:
        raise CompressError(f"quantize takes float32, float16 or bfloat16 tensors, got {x.dtype}; cast x.")
    if group_size <= 0 or group_size % 8:
        raise CompressError(f"group_size={group_size} must be a positive multiple of 8 (ActNN uses 256).")
    N, M, G = _grid(x.shape, per_sample, group_size)
    widths = _widths(bits, x, N, per_sample)
    lo = torch.empty(N, G, dtype=_META[x.dtype], device=x.device)
    step = torch.empty_like(lo)
    if stochastic and seed is None:
        seed = int(torch.randint(2**31 - 1, ()))
    codes = dispatch(x, _quantize_triton, _quantize_reference, x.reshape(N, M), widths, group_size, stochastic,
                     seed, lo, step)
    if check and not bool(torch.isfinite(step).all()):
        raise NonFiniteError("quantize: x holds NaN or Inf values, which have no quantized code; check the "
                             "forward pass for overflow (or pass check=False to skip this test).")
    if isinstance(widths, int):
        meta, bits = (lo, step), widths
    else:
        meta, bits = (lo, step, widths), int(widths.max()) if N else 0
    params = {"group_size": group_size, "per_sample": per_sample}
    return Packed(codes, meta, x.shape, x.dtype, bits, "group", params)


def dequantize(p: Packed) -> torch.Tensor:
    """The dense tensor that p stands for: p.shape, p.dtype, on p's device."""
    return decode(p)


@register_layout("group")
def _decode(p: Packed) -> torch.Tensor:
    gs = p.params["group_size"]
    N, M, G = _grid(p.shape, p.params["per_sample"], gs)
    widths = p.meta[2] if len(p.meta) == 3 else p.bits
    return dispatch(p.codes, _decode_triton, _decode_reference, p, widths, N, M, G).reshape(p.shape)


def _decode_triton(p: Packed, widths, N: int, M: int, G: int) -> torch.Tensor:
    out = torch.empty(N, M, dtype=p.dtype, device=p.device)
    triton_quant.dequantize(p.codes, *p.meta[:2], widths, p.params["group_size"], out)
    return out


def _decode_reference(p: Packed, widths, N: int, M: int, G: int) -> torch.Tensor:
    """Slab by slab, from each slab's packed bytes straight into the output."""
    gs = p.params["group_size"]
    lo, step = (m.view(-1, 1) for m in p.meta[:2])
    out = torch.empty(N, M, dtype=p.dtype, device=p.device)
    values = torch.empty(min(N * G, _slab_rows(gs)), gs, dtype=torch.float32, device=p.device)  # reused
    for s, _, pieces in _slabs(widths, N, G, gs):
        blocks = torch.zeros(s.stop - s.start, gs // 8, 8, dtype=torch.uint8, device=p.device)
        for rows, count, b, at in pieces:
            packed = p.codes[at : at + count * gs // 8 * b].view(count, -1, b)
            planes(blocks, b)[rows] = planes(packed, b)
        v = values[: s.stop - s.start].copy_(transpose_blocks_(blocks.view(-1, 8)).view(-1, gs))
        v.mul_(step[s].float()).add_(lo[s].float())
        for part, place in _runs(v, out, s, G):
            place.copy_(part)
    return out


def _grid(shape: torch.Size, per_sample: bool, group_size: int) -> tuple[int, int, int]:
    """(samples N, values per sample M, groups per sample G). Only a tensor with a batch dimension
    (2-D or more) has samples; anything else is one sample."""
    N = shape[0] if per_sample and len(shape) >= 2 else 1
    M = shape[1:].numel() if len(shape) >= 2 and per_sample else shape.numel()
    return N, M, -(-M // group_size)


def _widths(bits, x: torch.Tensor, N: int, per_sample: bool):
    """bits as an int of WIDTHS, or as a uint8 tensor [N] of per-sample widths on x's device."""
    if torch.is_tensor(bits) and bits.dim() > 0:
        if not per_sample or x.dim() < 2:
            raise CompressError("Per-sample bits need per_sample=True and an input with a batch dimension.")
        if bits.is_floating_point() or bits.dtype == torch.bool or bits.shape != (N,):
            raise CompressError(f"Per-sample bits must be a 1-D integer tensor of {N} widths (one per sample), "
                                f"got {bits.dtype} of shape {tuple(bits.shape)}.")
        if N and not bool(((bits >= 1) & (bits <= 8)).all()):
            raise CompressError(f"Per-sample widths must lie in 1..8, got {sorted(set(bits.tolist()))}.")
        return bits.to(device=x.device, dtype=torch.uint8)
    if isinstance(bits, bool) or int(bits) != bits or int(bits) not in WIDTHS:
        raise CompressError(f"bits={bits} is not a quantization width; valid widths: "
                            f"{', '.join(map(str, WIDTHS))} (or a 1-D tensor of per-sample widths 1..8).")
    return int(bits)


def _packed_bytes(widths, N: int, codes_per_sample: int) -> int:
    total = widths * N if isinstance(widths, int) else int(widths.sum())
    return total * codes_per_sample // 8


def _round(v: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """The value of `dtype` next to float32 v on the side `up` (or down; v itself if representable),
    as float32. Capped at dtype's max going up."""
    y = v.to(dtype)
    off = y.float() < v if up else y.float() > v
    toward = torch.full_like(y, float("inf") if up else -float("inf"))
    y = torch.where(off, torch.nextafter(y, toward), y).float()
    return y.clamp_max_(torch.finfo(dtype).max) if up else y


def _quantize_triton(x2, widths, group_size, stochastic, seed, lo, step):
    codes = torch.empty(_packed_bytes(widths, x2.shape[0], lo.shape[1] * group_size), dtype=torch.uint8,
                        device=x2.device)
    triton_quant.quantize(x2.contiguous(), widths, group_size, stochastic, seed, lo, step, codes)
    return codes


def _quantize_reference(x2, widths, group_size, stochastic, seed, lo, step):
    """Slab by slab: only the output (codes, lo, step) is as large as the input."""
    N, M = x2.shape
    G = lo.shape[1]
    xg = x2.reshape(N * G, group_size) if M == G * group_size else None  # else padded slab by slab
    gen = torch.Generator(x2.device).manual_seed(seed) if stochastic else None
    out = torch.empty(_packed_bytes(widths, N, G * group_size), dtype=torch.uint8, device=x2.device)
    lo_rows, step_rows = lo.view(-1, 1), step.view(-1, 1)
    for s, bits, pieces in _slabs(widths, N, G, group_size):
        xs = _padded_groups(x2, s, G, group_size) if xg is None else xg[s]
        levels = (1 << bits) - 1 if isinstance(bits, int) else ((1 << bits.long()) - 1).float().view(-1, 1)
        codes, lo_rows[s], step_rows[s] = _quantize_slab(xs, levels, lo.dtype, gen)
        codes[_padding(s, M, G, group_size)] = 0
        blocks = transpose_blocks_(codes.view(-1, 8)).view(-1, group_size // 8, 8)
        for rows, count, b, at in pieces:
            place = out[at : at + count * group_size // 8 * b].view(count, -1, b)
            planes(place, b).copy_(planes(blocks, b)[rows])
    return out


def _slab_rows(gs: int) -> int:
    """Groups per slab."""
    return max(1, SLAB // gs)


def _slabs(widths, N: int, G: int, gs: int):
    """The slabs of the groups [N * G, gs], SLAB elements each, in row order (which fixes the random
    stream), as (rows s; the width of each row, or an int for all; pieces). A piece is (its rows in the
    slab, a slice or a mask; how many; their width; the first byte of their codes in the output): per-
    sample widths store the samples by ascending width, ties in sample order, so the slab's rows of one
    width are one run of the output, and a slab has a piece per width it holds."""
    per_slab = _slab_rows(gs)
    if not isinstance(widths, int):
        order = torch.argsort(widths, stable=True)
        size = widths[order].long() * (G * gs // 8)
        first = torch.empty_like(size)
        first[order] = size.cumsum(0) - size  # the first byte of each sample
        wl, fl = widths.tolist(), first.tolist()
    for r0 in range(0, N * G, per_slab):
        s = slice(r0, min(r0 + per_slab, N * G))
        if isinstance(widths, int):
            yield s, widths, [(slice(None), s.stop - r0, widths, r0 * gs // 8 * widths)]
            continue
        bits = widths[torch.arange(r0, s.stop, device=widths.device) // G]
        n0, n1 = r0 // G, (s.stop - 1) // G + 1  # the samples it holds rows of
        present, pieces = sorted(set(wl[n0:n1])), []
        for b in present:
            rows = slice(None) if len(present) == 1 else bits == b
            n = wl.index(b, n0, n1)  # the first of them of width b
            at = fl[n] + (max(r0, n * G) - n * G) * (gs // 8) * b
            pieces.append((rows, s.stop - r0 if len(present) == 1 else int(rows.sum()), b, at))
        yield s, bits, pieces


def _padded_groups(x2: torch.Tensor, s: slice, G: int, gs: int) -> torch.Tensor:
    """Rows s of x2's groups [N * G, gs], each sample padded with its last value: copied slab by slab,
    so that no padded copy of the whole input is made."""
    xs = x2.new_empty(s.stop - s.start, gs)
    for part, place in _runs(xs, x2, s, G):
        part.copy_(place)
    rows, tail = _padding(s, x2.shape[1], G, gs)
    last = xs[rows]  # a view: the slab's last groups of samples
    last[:, tail] = last[:, tail.start - 1 : tail.start]
    return xs


def _runs(slab: torch.Tensor, t2: torch.Tensor, s: slice, G: int):
    """Pairs of views (values of `slab`, rows s of the groups [N * G, gs]; their place in t2 [N, M])
    that cover the slab but for its padding, in three plain copies at most: the rest of the sample it
    starts in, its whole samples, the beginning of the sample it ends in."""
    M, gs = t2.shape[1], slab.shape[1]
    flat, runs = slab.view(-1), []
    n0, n1 = -(-s.start // G), s.stop // G  # its whole samples: n0 .. n1 - 1
    if s.start % G:
        n, j = divmod(s.start, G)
        end = min(M, (min(s.stop, (n + 1) * G) - n * G) * gs)
        runs.append((flat[: end - j * gs], t2[n, j * gs : end]))
    if n1 > n0:
        at = (n0 * G - s.start) * gs
        runs.append((flat[at : at + (n1 - n0) * G * gs].view(n1 - n0, G * gs)[:, :M], t2[n0:n1]))
    if s.stop % G and n1 >= n0:
        runs.append((flat[(n1 * G - s.start) * gs :], t2[n1, : (s.stop - n1 * G) * gs]))
    return runs


def _padding(s: slice, M: int, G: int, gs: int) -> tuple[slice, slice]:
    """The padding in the slab of group rows s: (its rows, the last group of each sample; their columns)."""
    return slice((G - 1 - s.start) % G, None, G), slice(M - (G - 1) * gs, None)


def _quantize_slab(xs: torch.Tensor, levels, meta_dtype: torch.dtype, gen: torch.Generator | None):
    """Codes (uint8), lo and step ([rows, 1]) of a slab of groups."""
    x = xs.float()
    mn, mx = x.amin(1, keepdim=True), x.amax(1, keepdim=True)  # NaN and Inf propagate here
    lo = _round(mn, meta_dtype, up=False)
    step = _round((mx - lo) / levels, meta_dtype, up=True)
    step.masked_fill_(~(mn.isfinite() & mx.isfinite()), math.nan)  # for quantize's check
    v = torch.sub(x, lo).mul_(torch.where(step > 0, 1 / step, 0.0))
    if gen is None:
        v.add_(0.5)
    else:  # u = (r + 1/2) / 2^16, r uniform on 16 bits: one 64-bit draw serves four values
        r = torch.empty(v.numel() // 4, dtype=torch.int64, device=v.device)
        r.random_(-(2**63), None, generator=gen)
        v.add_(r.view(torch.int16).view_as(v).float().add_(32768.5), alpha=2**-16)
    return v.clamp_max_(levels).to(torch.uint8), lo, step
