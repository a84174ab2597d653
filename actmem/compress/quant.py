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
temporaries stay in cache, and draws u on a 2^-16 lattice, (r + 1/2) / 2^16 with r 16 random bits
of a torch.Generator: the mean is exactly 1/2, the bias of a rounding at most 2^-17 of a step, at
a quarter of the generator calls of torch.rand (the generator is serial on CPU). The Triton kernels
(triton_quant.py) use Philox's float32 `tl.rand`.

Per-sample widths (ActNN's mixed precision): `bits` may be a 1-D tensor, one width 1..8 per sample;
the samples' codes are then stored by ascending width (ties in sample order), each densely at its
own width, and the widths (uint8, N bytes) join the metadata.
"""
from __future__ import annotations

import math

import torch

from actmem.compress import triton_quant
from actmem.compress.backend import dispatch
from actmem.compress.packed import Packed, decode, register_layout
from actmem.compress.packing import pack_blocks_, unpack_codes
from actmem.errors import ConfigError, NonFiniteError

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
        raise ConfigError(f"quantize takes float32, float16 or bfloat16 tensors, got {x.dtype}; cast x.")
    if group_size <= 0 or group_size % 8:
        raise ConfigError(f"group_size={group_size} must be a positive multiple of 8 (ActNN uses 256).")
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
    gs = p.params["group_size"]
    lo, step = p.meta[:2]
    codes = _unpack(p.codes, widths, N, G * gs).view(-1, gs)
    lo, step = lo.view(-1, 1).float(), step.view(-1, 1).float()
    out = torch.empty(N * G, gs, dtype=p.dtype, device=p.device)
    rows = max(1, SLAB // gs)
    for r in range(0, N * G, rows):
        s = slice(r, r + rows)
        out[s] = torch.mul(codes[s], step[s]).add_(lo[s])
    return out.view(N, G * gs)[:, :M]


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
            raise ConfigError("Per-sample bits need per_sample=True and an input with a batch dimension.")
        if bits.is_floating_point() or bits.dtype == torch.bool or bits.shape != (N,):
            raise ConfigError(f"Per-sample bits must be a 1-D integer tensor of {N} widths (one per sample), "
                              f"got {bits.dtype} of shape {tuple(bits.shape)}.")
        if N and not bool(((bits >= 1) & (bits <= 8)).all()):
            raise ConfigError(f"Per-sample widths must lie in 1..8, got {sorted(set(bits.tolist()))}.")
        return bits.to(device=x.device, dtype=torch.uint8)
    if isinstance(bits, bool) or int(bits) != bits or int(bits) not in WIDTHS:
        raise ConfigError(f"bits={bits} is not a quantization width; valid widths: "
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


def _levels(widths, G: int):
    """2^b - 1 for every group: an int, or a float32 column [N * G, 1] for per-sample widths."""
    if isinstance(widths, int):
        return (1 << widths) - 1
    return ((1 << widths.long()) - 1).float().repeat_interleave(G).view(-1, 1)


def _quantize_triton(x2, widths, group_size, stochastic, seed, lo, step):
    codes = torch.empty(_packed_bytes(widths, x2.shape[0], lo.shape[1] * group_size), dtype=torch.uint8,
                        device=x2.device)
    triton_quant.quantize(x2.contiguous(), widths, group_size, stochastic, seed, lo, step, codes)
    return codes


def _quantize_reference(x2, widths, group_size, stochastic, seed, lo, step):
    N, M = x2.shape
    G = lo.shape[1]
    width = G * group_size
    if width != M:  # pad each sample with its last value
        x2 = torch.cat([x2, x2[:, -1:].expand(N, width - M)], 1)
    xg = x2.reshape(N * G, group_size)
    levels = _levels(widths, G)
    gen = torch.Generator(x2.device).manual_seed(seed) if stochastic else None
    codes = torch.empty(N * G, group_size, dtype=torch.uint8, device=x2.device)
    lo_rows, step_rows = lo.view(-1, 1), step.view(-1, 1)
    rows = max(1, SLAB // group_size)
    for r in range(0, N * G, rows):
        s = slice(r, r + rows)
        lvl = levels if isinstance(levels, int) else levels[s]
        codes[s], lo_rows[s], step_rows[s] = _quantize_slab(xg[s], lvl, lo.dtype, gen)
    codes.view(N, width)[:, M:] = 0
    return _pack(codes.view(N, width), widths)


def _quantize_slab(xs: torch.Tensor, levels, meta_dtype: torch.dtype, gen: torch.Generator | None):
    """Codes (float32, integral, still to be truncated), lo and step ([rows, 1]) of a slab of groups."""
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
    return v.clamp_max_(levels), lo, step


def _pack(codes: torch.Tensor, widths) -> torch.Tensor:
    """Pack codes [N, C] (uint8, contiguous, overwritten): one width, or by ascending per-sample width."""
    if isinstance(widths, int):
        return pack_blocks_(codes.view(-1, 8), widths)
    parts = [pack_blocks_(codes[widths == w].view(-1, 8), w) for w in widths.unique().tolist()]
    return torch.cat(parts) if parts else codes.new_empty(0)


def _unpack(packed: torch.Tensor, widths, N: int, C: int) -> torch.Tensor:
    """Inverse of _pack: codes [N, C] (uint8)."""
    if isinstance(widths, int):
        return unpack_codes(packed, widths, N * C).view(N, C)
    codes = torch.empty(N, C, dtype=torch.uint8, device=packed.device)
    start = 0
    for w in widths.unique().tolist():
        sel = widths == w
        size = int(sel.sum()) * C // 8 * w
        codes[sel] = unpack_codes(packed[start:start + size], w, size // w * 8).view(-1, C)
        start += size
    return codes
