"""Index codes: masks, argmax indices, few-bit buckets and the fused lookup-multiply, on both backends
(Triton through its interpreter on CPU tensors)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined (import time)

import pytest  # noqa: E402
import torch  # noqa: E402

from actmem.compress.errors import CompressError  # noqa: E402
from actmem.compress.index import bucketize_pack, lookup_mul, pack_index, pack_mask  # noqa: E402
from actmem.compress.packed import decode  # noqa: E402

BACKENDS = ["reference", "triton"]
SHAPES = [(1,), (13,), (2, 3, 5, 7), (1, 64), (4, 33)]


def on(backend, fn, *args, **kwargs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACTMEM_BACKEND", backend)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("shape", SHAPES + [(0,), (3, 0)])
def test_mask_round_trip_and_size(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    ref, tri = on("reference", pack_mask, mask), on("triton", pack_mask, mask)
    assert torch.equal(ref.codes, tri.codes)
    assert ref.nbytes == (mask.numel() + 7) // 8
    for backend in BACKENDS:
        out = on(backend, decode, ref)
        assert out.dtype == torch.bool and torch.equal(out, mask)


def test_mask_of_non_contiguous_tensor():
    x = torch.randn(6, 10).t()
    assert torch.equal(decode(pack_mask(x > 0)), x > 0)
    assert torch.equal(on("triton", decode, on("triton", pack_mask, x > 0)), x > 0)


@pytest.mark.parametrize("bits", range(1, 9))
def test_index_round_trip_bit_exact(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 7, 5), generator=g)
    codes.view(-1)[:2] = torch.tensor([0, (1 << bits) - 1])
    ref, tri = on("reference", pack_index, codes, bits), on("triton", pack_index, codes, bits)
    assert torch.equal(ref.codes, tri.codes)
    assert ref.nbytes == bits * 14  # 105 codes -> 14 blocks of 8 -> bits bytes each
    for backend in BACKENDS:
        out = on(backend, decode, tri)
        assert out.dtype == torch.uint8 and torch.equal(out, codes.to(torch.uint8))


def test_index_rejects_codes_out_of_range():
    with pytest.raises(CompressError, match="4 bits cannot hold"):
        pack_index(torch.tensor([0, 16]), 4)
    with pytest.raises(CompressError, match="cannot hold"):
        pack_index(torch.tensor([-1, 3]), 4)
    with pytest.raises(CompressError, match="integer codes"):
        pack_index(torch.tensor([0.0]), 4)
    with pytest.raises(CompressError, match="valid widths"):
        pack_index(torch.tensor([0]), 9)


def _borders(bits, dtype=torch.float32):
    b = torch.sort(torch.randn(2**bits - 1, generator=torch.Generator().manual_seed(bits)))[0]
    return b.to(dtype)


def _edge_values(borders, n, dtype):
    """Random values plus the borders themselves, their bf16/fp16 neighbours, +-inf and NaN."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    special = torch.cat([borders.float(), borders.to(dtype).float(),
                         torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])])
    return torch.cat([x, special]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_bucketize_matches_torch(bits, dtype):
    borders = _borders(bits)  # fp32 borders: most are not representable in fp16/bf16
    x = _edge_values(borders, 61, dtype).view(-1, 1)  # odd total size, 2-D
    expected = torch.bucketize(x, borders, right=False).to(torch.uint8)
    packs = [on(b, bucketize_pack, x, borders, bits) for b in BACKENDS]
    assert torch.equal(packs[0].codes, packs[1].codes)
    assert packs[0].nbytes == bits * ((x.numel() + 7) // 8)
    for p in packs:
        assert torch.equal(decode(p), expected)


def test_bucketize_rejects_bad_borders():
    with pytest.raises(CompressError, match="needs 3 sorted"):
        bucketize_pack(torch.randn(4), torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(CompressError, match="valid widths"):
        bucketize_pack(torch.randn(4), torch.zeros(31), 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bits", [1, 3])
def test_lookup_mul_bit_exact(bits, dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 11, generator=g)
    borders = _borders(bits)
    levels = torch.randn(2**bits, generator=g)  # fp32 table, cast to grad's dtype as in the contract
    grad = torch.randn(3, 5, 11, generator=g).to(dtype).transpose(0, 2)  # non-contiguous
    codes = torch.bucketize(x, borders).transpose(0, 2)
    expected = levels[codes].to(dtype) * grad
    p = bucketize_pack(x.transpose(0, 2), borders, bits)
    for backend in BACKENDS:
        out = on(backend, lookup_mul, p, levels, grad)
        assert out.dtype == dtype and out.shape == grad.shape
        assert torch.equal(out, expected), backend


def test_lookup_mul_checks_its_inputs():
    p = bucketize_pack(torch.randn(4, 4), _borders(2), 2)
    with pytest.raises(CompressError, match="need 4 levels"):
        lookup_mul(p, torch.zeros(3), torch.randn(4, 4))
    with pytest.raises(CompressError, match="grad_out has shape"):
        lookup_mul(p, torch.zeros(4), torch.randn(16))
