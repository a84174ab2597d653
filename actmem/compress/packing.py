"""Dense b-bit code packing (b = 1..8): the torch reference, dispatching to Triton (`dispatch`).

Layout ("bit planes of 8"): codes are taken 8 at a time (the tail padded with zeros); each block of
8 codes becomes b bytes, byte j holding bit j of code k at bit position k. So n codes take
b * ceil(n / 8) bytes -- exactly b bits per code up to the last partial block -- and the same layout
serves every width, which keeps the Triton kernels and this reference identical.

Read a block as an 8x8 bit matrix, row k = code k = byte k of a little-endian int64 word and column
j = bit j: its packed bytes are the first b rows of the transpose. The transpose is three rounds of
shifts and masks on whole int64 words (Hacker's Delight, 7-3), its own inverse, and vectorises in
torch: about 20x faster than splitting codes into one byte per bit and summing. It runs on chunks of
_CHUNK words, so its one temporary stays at 256 KiB, in cache (several times faster on large arrays); a
block of codes packs into a slice of a larger output (`pack_into_`, `unpack_into_`): the references
of quant.py and split.py pack slab by slab, never holding all codes one byte each.
"""
from __future__ import annotations

import torch

from actmem.compress import triton_index
from actmem.compress.backend import dispatch
from actmem.compress.errors import CompressError

# (shift, mask): round r swaps the off-diagonal 2^r x 2^r sub-blocks of every 2^(r+1) x 2^(r+1) block.
_ROUNDS = ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0))
_CHUNK = 1 << 15  # int64 words per pass of transpose_blocks_: a 256 KiB temporary
_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # by size in bytes


def check_bits(bits: int, allowed=range(1, 9)) -> int:
    if int(bits) not in allowed:
        raise CompressError(f"bits={bits} cannot be packed here; valid widths: {', '.join(map(str, allowed))}.")
    return int(bits)


def packed_numel(n: int, bits: int) -> int:
    """Bytes that n codes of `bits` bits occupy."""
    return bits * ((n + 7) // 8)


def transpose_blocks_(blocks: torch.Tensor) -> torch.Tensor:
    """Transpose, in place, the 8x8 bit matrix of every 8-byte row of `blocks` (contiguous uint8 [B, 8]),
    _CHUNK words at a time so that the temporary stays small and in cache."""
    words = blocks.view(torch.int64).view(-1)
    t = torch.empty(min(words.numel(), _CHUNK), dtype=torch.int64, device=blocks.device)
    for i in range(0, words.numel(), _CHUNK):
        x = words[i : i + _CHUNK]
        u = t[: x.numel()]
        for shift, mask in _ROUNDS:
            # u = bits that differ from their partner `shift` places up; flip both. The arithmetic shift's
            # sign bits land outside every mask.
            torch.bitwise_right_shift(x, shift, out=u)
            u.bitwise_xor_(x).bitwise_and_(mask)
            x.bitwise_xor_(u)
            x.bitwise_xor_(u.bitwise_left_shift_(shift))
    return blocks


def planes(t: torch.Tensor, bits: int) -> torch.Tensor:
    """The first `bits` bytes of every row of uint8 t [..., 8 or bits] (contiguous rows), viewed as words
    of the largest power of two that divides `bits`: copies between blocks and packed bytes then move
    whole words, 6-8x faster than single bytes at 2 and 4 bits."""
    word = bits & -bits
    return t.view(_WORDS[word])[..., : bits // word]


def pack_into_(blocks: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Pack codes laid out as contiguous uint8 [B, 8] (overwritten) into `out`, B * bits contiguous bytes:
    a slice of a larger packed tensor, so that a slab of codes is packed where it belongs."""
    planes(out.view(-1, bits), bits).copy_(planes(transpose_blocks_(blocks), bits))
    return out


def unpack_into_(packed: torch.Tensor, bits: int, blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_into_: the codes of `packed` (B * bits bytes) written to uint8 blocks [B, 8]."""
    blocks.zero_()
    planes(blocks, bits).copy_(planes(packed.view(-1, bits), bits))
    return transpose_blocks_(blocks)


def pack_blocks_(blocks: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes already laid out as contiguous uint8 [B, 8] (overwritten) into 1-D uint8 [B * bits]
    that owns its storage (so `Packed.nbytes` counts just these bytes)."""
    if bits == 8:
        return transpose_blocks_(blocks).view(-1)
    out = torch.empty(blocks.shape[0] * bits, dtype=torch.uint8, device=blocks.device)
    return pack_into_(blocks, bits, out)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) (any shape, flattened) into a 1-D uint8 tensor."""
    check_bits(bits)
    return dispatch(codes, _pack_triton, _pack_reference, codes.reshape(-1), bits)


def _pack_triton(flat: torch.Tensor, bits: int) -> torch.Tensor:
    out = torch.empty(packed_numel(flat.numel(), bits), dtype=torch.uint8, device=flat.device)
    triton_index.pack((flat.view(torch.uint8) if flat.dtype == torch.bool else flat).contiguous(), bits, out)
    return out


def _pack_reference(flat: torch.Tensor, bits: int) -> torch.Tensor:
    n = flat.numel()
    blocks = torch.empty((n + 7) // 8, 8, dtype=torch.uint8, device=flat.device)
    blocks.view(-1)[:n] = flat
    blocks.view(-1)[n:] = 0
    return pack_blocks_(blocks, bits)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes: the first n codes as a 1-D uint8 tensor."""
    check_bits(bits)
    return dispatch(packed, _unpack_triton, _unpack_reference, packed, bits, n)


def _unpack_triton(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.uint8, device=packed.device)
    triton_index.unpack(packed, bits, out)
    return out


def _unpack_reference(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    blocks = torch.empty(packed.numel() // bits, 8, dtype=torch.uint8, device=packed.device)
    return unpack_into_(packed, bits, blocks).view(-1)[:n]
