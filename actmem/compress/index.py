"""Index codes, bit-packed: ReLU/Dropout masks (1 bit), max-pool argmax indices, few-bit buckets.

These are exact: what a strategy packs is what it gets back. Layouts (both "bit planes of 8", see
packing.py; no metadata, so `nbytes == bits * ceil(numel / 8)`):
- "mask":  1 bit per element, decodes to a bool tensor (`unpack_mask`);
- "index": `bits` bits per element, decodes to uint8 codes (`unpack_index`); `pack_index` and
  `bucketize_pack` both produce it, and `lookup_mul` consumes it (the few-bit backward).
"""
from __future__ import annotations

import torch

from actmem.compress import triton_index
from actmem.compress.backend import dispatch
from actmem.compress.errors import CompressError
from actmem.compress.packed import Packed, register_layout
from actmem.compress.packing import check_bits, pack_blocks_, pack_codes, packed_numel, unpack_codes
from actmem.compress.quant import SLAB


def pack_mask(mask: torch.Tensor) -> Packed:
    """1 bit per element of a bool tensor (ReLU sign, Dropout keep)."""
    if mask.dtype != torch.bool:
        raise CompressError(f"pack_mask takes a bool tensor, got {mask.dtype}; pass `x > 0` rather than x.")
    codes = pack_codes(mask.reshape(-1).view(torch.uint8), 1)
    return Packed(codes, (), mask.shape, torch.bool, 1, "mask")


@register_layout("mask")
def unpack_mask(p: Packed) -> torch.Tensor:
    """The mask as a bool tensor of the original shape."""
    return unpack_codes(p.codes, 1, p.shape.numel()).view(torch.bool).view(p.shape)


def pack_index(codes: torch.Tensor, bits: int) -> Packed:
    """Pack integer codes in [0, 2**bits) (e.g. the argmax within a 3x3 pooling window: 4 bits).

    The range is checked (one min/max pass; a sync on GPU) because out-of-range codes would
    otherwise lose their high bits silently.
    """
    bits = check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise CompressError(f"pack_index takes integer codes, got {codes.dtype}; use pack_mask for bool masks.")
    if codes.numel():
        lo, hi = torch.aminmax(codes)
        if lo < 0 or hi >= 1 << bits:
            raise CompressError(f"pack_index: codes span [{int(lo)}, {int(hi)}], which {bits} bits cannot "
                                f"hold; pass bits >= {int(hi).bit_length()} or codes in [0, {1 << bits}).")
    return Packed(pack_codes(codes, bits), (), codes.shape, torch.uint8, bits, "index")


@register_layout("index")
def unpack_index(p: Packed) -> torch.Tensor:
    """The codes as a uint8 tensor of the original shape."""
    return unpack_codes(p.codes, p.bits, p.shape.numel()).view(p.shape)


def _round_down(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest value of `dtype` <= each value (exact when `dtype` holds it)."""
    low = values.to(dtype)
    below = torch.nextafter(low, torch.full_like(low, -torch.inf))
    return torch.where(low.to(values.dtype) > values, below, low)


def _bucketize_triton(x: torch.Tensor, borders: torch.Tensor, bits: int) -> torch.Tensor:
    codes = torch.empty(packed_numel(x.numel(), bits), dtype=torch.uint8, device=x.device)
    triton_index.bucketize(x.reshape(-1).contiguous(), borders.contiguous(), bits, codes)
    return codes


def _bucketize_reference(x: torch.Tensor, borders: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed codes #{i : not borders[i] >= x} = len(borders) - #{i : x <= borders[i]}.

    One comparison per border (at most 15) over slabs of SLAB elements that stay in cache, in x's
    own dtype: for x of that dtype, x <= b exactly when x <= b rounded down to the dtype.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    codes = torch.zeros(n + -n % 8, dtype=torch.uint8, device=x.device)
    below = torch.empty(min(n, SLAB), dtype=torch.bool, device=x.device)
    lowered = _round_down(borders, x.dtype).tolist()
    for r in range(0, n, SLAB):
        xs, cs, bs = flat[r : r + SLAB], codes[r : min(r + SLAB, n)], below[: min(SLAB, n - r)]
        cs.fill_(len(lowered))
        for border in lowered:
            cs -= torch.le(xs, border, out=bs).view(torch.uint8)
    return pack_blocks_(codes.view(-1, 8), bits)


def bucketize_pack(x: torch.Tensor, borders: torch.Tensor, bits: int) -> Packed:
    """Index of the interval of x among 2**bits - 1 sorted inner borders, packed (layout "index").

    Same convention as `torch.bucketize(x, borders, right=False)`: code i means
    borders[i-1] < x <= borders[i]; the comparison runs in the dtype x and borders promote to
    (exact); NaN gets the last code, as in torch. bits = 1..4 (few-bit backward tables).
    """
    bits = check_bits(bits, range(1, 5))
    if not x.is_floating_point():
        raise CompressError(f"bucketize_pack takes a floating-point tensor, got {x.dtype}.")
    if borders.dim() != 1 or borders.numel() != (1 << bits) - 1 or not borders.is_floating_point():
        raise CompressError(f"bucketize_pack at {bits} bits needs {(1 << bits) - 1} sorted floating-point "
                            f"inner borders in a 1-D tensor, got {tuple(borders.shape)} ({borders.dtype}).")
    borders = borders.to(device=x.device, dtype=torch.promote_types(x.dtype, borders.dtype))
    codes = dispatch(x, _bucketize_triton, _bucketize_reference, x, borders, bits)
    return Packed(codes, (), x.shape, torch.uint8, bits, "index")


def lookup_mul(p: Packed, levels: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """`levels[code] * grad_out`, fused with the unpacking (the few-bit backward).

    Bit for bit equal to `levels[codes].to(grad_out.dtype) * grad_out`: the levels are cast to
    grad_out's dtype first and the product is rounded once to that dtype (the Triton kernel
    multiplies in fp32, where fp16/bf16 products are exact). Result: grad_out's shape and dtype.
    """
    if p.layout not in ("index", "mask"):
        raise CompressError(f"lookup_mul needs index codes (bucketize_pack, pack_index), got {p.layout!r}.")
    if levels.dim() != 1 or levels.numel() != 1 << p.bits:
        raise CompressError(f"lookup_mul: {p.bits}-bit codes need {1 << p.bits} levels in a 1-D tensor, "
                            f"got shape {tuple(levels.shape)}.")
    if grad_out.shape != p.shape:
        raise CompressError(f"lookup_mul: grad_out has shape {tuple(grad_out.shape)}, the codes "
                            f"{tuple(p.shape)}.")
    levels = levels.to(device=grad_out.device, dtype=grad_out.dtype)
    return dispatch(grad_out, _lookup_mul_triton, _lookup_mul_reference, p, levels, grad_out)


def _lookup_mul_triton(p: Packed, levels: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    grad = grad_out.contiguous()
    out = torch.empty_like(grad)
    triton_index.lookup_mul(p.codes, p.bits, levels.contiguous(), grad, out)
    return out


def _lookup_mul_reference(p: Packed, levels: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    codes = unpack_codes(p.codes, p.bits, p.shape.numel())
    grad = grad_out.reshape(-1)
    out = torch.empty_like(grad)
    for r in range(0, grad.numel(), SLAB):  # slabs that stay in cache
        s = slice(r, r + SLAB)
        torch.index_select(levels, 0, codes[s].int(), out=out[s]).mul_(grad[s])
    return out.view(p.shape)
