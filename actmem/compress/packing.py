"""Dense b-bit code packing (b = 1..8), torch reference.

Layout ("bit planes of 8"): codes are taken 8 at a time (the tail padded with zeros); each block of
8 codes becomes b bytes, byte j holding bit j of code k at bit position k. So n codes take
b * ceil(n / 8) bytes -- exactly b bits per code up to the last partial block -- and the same layout
serves every width, which keeps the Triton kernels and this reference identical.
"""
from __future__ import annotations

import torch

from actmem.errors import ConfigError

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def check_bits(bits: int, allowed=range(1, 9)) -> int:
    if int(bits) not in allowed:
        raise ConfigError(f"bits={bits} cannot be packed here; valid widths: {', '.join(map(str, allowed))}.")
    return int(bits)


def packed_numel(n: int, bits: int) -> int:
    """Bytes that n codes of `bits` bits occupy."""
    return bits * ((n + 7) // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) (any shape, flattened) into a 1-D uint8 tensor."""
    check_bits(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    blocks = flat.view(-1, 1, 8)  # [blocks, 1, 8 codes]
    planes = torch.arange(bits, dtype=torch.uint8, device=codes.device).view(1, bits, 1)
    shifts = _SHIFTS.to(codes.device)
    bitvals = ((blocks >> planes) & 1) << shifts  # [blocks, bits, 8]
    return bitvals.sum(dim=2, dtype=torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes: the first n codes as a 1-D uint8 tensor."""
    check_bits(bits)
    planes_bytes = packed.view(-1, bits, 1)  # [blocks, bits, 1]
    shifts = _SHIFTS.to(packed.device)
    bitvals = (planes_bytes >> shifts) & 1  # [blocks, bits, 8 codes]
    weights = (1 << torch.arange(bits, dtype=torch.uint8, device=packed.device)).view(1, bits, 1)
    codes = (bitvals * weights).sum(dim=1, dtype=torch.uint8)  # [blocks, 8]
    return codes.reshape(-1)[:n]
