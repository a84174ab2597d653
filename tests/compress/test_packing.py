"""Dense b-bit code packing ("bit planes of 8"): the layout, round trips, sizes, and the Triton kernels
(through the interpreter on CPU tensors) against the torch reference."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined (import time)

import pytest  # noqa: E402
import torch  # noqa: E402

from actmem.compress.errors import CompressError  # noqa: E402
from actmem.compress.packing import (  # noqa: E402
    check_bits,
    pack_codes,
    packed_numel,
    transpose_blocks_,
    unpack_codes,
)

SIZES = [0, 1, 7, 8, 9, 1001]


def on(backend, fn, *args, **kwargs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACTMEM_BACKEND", backend)
        return fn(*args, **kwargs)


def codes_for(bits, n, seed=0):
    return torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def planes_oracle(codes, bits):
    """The layout written out bit by bit: byte j of block i = sum_k bit j of code 8i+k, times 2^k."""
    n = codes.numel()
    blocks = torch.nn.functional.pad(codes.long(), (0, (-n) % 8)).view(-1, 1, 8)
    bit = (blocks >> torch.arange(bits).view(1, bits, 1)) & 1
    return (bit << torch.arange(8)).sum(2).to(torch.uint8).reshape(-1)


def test_layout_by_hand():
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0b10000001, 0b00000001]
    # 2 bits: byte 0 holds the low bits (codes 3 and 1 -> k = 0, 1), byte 1 the high bits (3, 2 -> k = 0, 2)
    assert pack_codes(torch.tensor([3, 1, 2, 0]), 2).tolist() == [0b011, 0b101]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", SIZES)
def test_round_trip_layout_and_size(bits, n):
    codes = codes_for(bits, n)
    packed = pack_codes(codes, bits)
    assert torch.equal(packed, planes_oracle(codes, bits))
    assert packed.numel() == packed_numel(n, bits) == bits * ((n + 7) // 8)
    assert packed.untyped_storage().nbytes() == packed.numel()  # owns just its bytes
    assert torch.equal(unpack_codes(packed, bits, n), codes)
    assert torch.equal(pack_codes(codes.long().view(-1, 1), bits), packed)  # any integer dtype and shape


def test_bool_codes_and_input_untouched():
    mask = torch.rand(77, generator=torch.Generator().manual_seed(1)) > 0.5
    keep = mask.clone()
    assert torch.equal(unpack_codes(pack_codes(mask, 1), 1, 77), mask.to(torch.uint8))
    assert torch.equal(mask, keep)


def test_transpose_is_an_involution():
    blocks = torch.randint(0, 256, (33, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    twice = transpose_blocks_(transpose_blocks_(blocks.clone()))
    assert torch.equal(twice, blocks)
    # and a transpose: bit j of byte k moves to bit k of byte j
    once = transpose_blocks_(blocks.clone())
    bit = lambda b: (b.long().unsqueeze(-1) >> torch.arange(8)) & 1  # [.., byte, bit]
    assert torch.equal(bit(once), bit(blocks).transpose(1, 2))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 9, 1001, 2 * 2048 + 5])
def test_triton_matches_reference(bits, n):
    codes = codes_for(bits, n, seed=bits)
    ref = on("reference", pack_codes, codes, bits)
    tri = on("triton", pack_codes, codes, bits)
    assert torch.equal(tri, ref)
    assert torch.equal(on("triton", unpack_codes, ref, bits, n), codes)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_width(bits):
    with pytest.raises(CompressError, match="valid widths"):
        check_bits(bits)
    with pytest.raises(CompressError, match=f"bits={bits} cannot be packed"):
        pack_codes(torch.zeros(8, dtype=torch.uint8), bits)
