"""actmem.compress on CUDA tensors: every Triton kernel against the torch reference run on the same
CUDA tensors (ACTMEM_BACKEND=reference). Bit-identical codes, metadata and decoded values where the
rounding is deterministic; unbiased where it is stochastic (the mean of the decodes over many seeds
approaches x within a few standard errors). The forward-AD kernel against torch.func.jvp."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from actmem import compress
from actmem.compress import grid, index, packing, split
from actmem.compress.triton_activation import KINDS, value_and_derivative

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEEDS = 256  # stochastic rounding: decodes averaged over this many seeds


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_id(value):
    return "x".join(map(str, value)) if isinstance(value, tuple) else None


def on(backend: str, fn, *args, **kwargs):
    """fn under ACTMEM_BACKEND=backend (the dispatch reads it at every call)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACTMEM_BACKEND", backend)
        return fn(*args, **kwargs)


def both(fn, *args, **kwargs):
    """(Triton kernel's result, torch reference's result) on the same CUDA tensors."""
    return on("triton", fn, *args, **kwargs), on("reference", fn, *args, **kwargs)


def assert_same_packed(a, b):
    assert (a.layout, a.shape, a.dtype, a.bits, a.params) == (b.layout, b.shape, b.dtype, b.bits, b.params)
    for s, t in zip(a.tensors(), b.tensors(), strict=True):
        assert s.dtype == t.dtype and s.device == t.device and torch.equal(s, t)


def sample(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Samples with different offsets and spreads (1e-3 .. 30), so that groups and planes differ."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    lead = (shape[0],) + (1,) * (len(shape) - 1)
    spread = 10 ** (torch.rand(lead, generator=g, device=DEVICE) * 4.5 - 3)
    offset = torch.randn(lead, generator=g, device=DEVICE) * 10
    return (torch.randn(shape, generator=g, device=DEVICE) * spread + offset).to(dtype)


def assert_unbiased(x: torch.Tensor, decode_with_seed, step: torch.Tensor):
    """Every decode within a step of x; the mean over SEEDS decodes within 5 standard errors of x,
    element by element (a rounding to one of two grid points a step apart has variance <= step^2 / 4),
    and the mean error over all elements within 5 of its own standard errors."""
    x, step = x.double(), step.double()
    total = torch.zeros_like(x)
    for seed in range(SEEDS):
        x_hat = decode_with_seed(seed).double()
        assert ((x_hat - x).abs() <= step * (1 + 1e-5) + x.abs() * 2e-7).all()
        total += x_hat
    se = step / (2 * math.sqrt(SEEDS))
    err = total / SEEDS - x
    assert (err.abs() <= 5 * se + x.abs() * 2e-7).all()
    assert abs(float(err.sum())) <= 5 * float(se.square().sum().sqrt()) + float(x.abs().sum()) * 2e-7


# --- group quantization (ActNN) ---------------------------------------------------------------------

QUANT_SHAPES = [((4, 64, 56, 56), 256), ((3, 300), 256), ((2, 3, 5, 7), 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shape, group_size", QUANT_SHAPES, ids=shape_id)
def test_quantize_nearest_bit_identical(shape, group_size, bits, dtype):
    x = sample(shape, dtype, seed=bits)
    tri, ref = both(compress.quantize, x, bits, group_size, stochastic=False)
    assert_same_packed(tri, ref)
    assert torch.equal(*both(compress.dequantize, ref))
    noisy = on("triton", compress.quantize, x, bits, group_size, seed=1)
    assert torch.equal(*both(compress.dequantize, noisy))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_quantize_per_sample_widths_bit_identical(dtype):
    """ActNN L3's mixed precision: one width per sample, stored by ascending width."""
    x = sample((6, 3, 20, 20), dtype)
    widths = torch.tensor([8, 1, 2, 4, 2, 3], device=DEVICE)
    tri, ref = both(compress.quantize, x, widths, stochastic=False)
    assert_same_packed(tri, ref)
    assert torch.equal(*both(compress.dequantize, ref))


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("bits", [1, 2])
def test_quantize_stochastic_unbiased(backend, bits):
    x = sample((4, 1000))
    p = on(backend, compress.quantize, x, bits, seed=0)
    step = p.meta[1].float().repeat_interleave(256, 1)[:, :1000]

    def decode(seed):
        return compress.dequantize(compress.quantize(x, bits, seed=seed))

    assert_unbiased(x, lambda seed: on(backend, decode, seed), step)


# --- DIVISION's split -------------------------------------------------------------------------------

SPLIT_SHAPES = [(4, 64, 56, 56), (1, 2, 28, 28), (2, 2, 7, 7), (2, 3, 9, 13), (3, 20), (2, 3, 17)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=shape_id)
def test_split_nearest_bit_identical(shape, bits, dtype):
    x = sample(shape, dtype, seed=bits)
    tri, ref = both(split.split_quantize, x, 8, bits, stochastic=False)
    assert_same_packed(tri, ref)
    out_tri, out_ref = both(split.split_dequantize, ref)
    assert out_tri.dtype == dtype and out_tri.shape == x.shape and torch.equal(out_tri, out_ref)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_split_stochastic_unbiased(backend):
    x = sample((2, 3, 16, 16))
    p = on(backend, split.split_quantize, x, 8, 2, seed=0)
    step = p.meta[1][:, 1].float().view(2, 3, 1, 1).expand_as(x)

    def decode(seed):
        return split.split_dequantize(split.split_quantize(x, 8, 2, seed=seed))

    assert_unbiased(x, lambda seed: on(backend, decode, seed), step)


# --- BLPA's fixed grid ------------------------------------------------------------------------------

def affine(shape, seed):
    """x and per-channel scale, offset, center as a BN layer gives them; two centers far off the grid."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, device=DEVICE) * 3 + 1
    scale = torch.rand(C, generator=g, device=DEVICE) * 0.5 + 0.2
    center = torch.randn(C, generator=g, device=DEVICE) * 2
    center[0], center[-1] = 40.0, -40.0
    return x, scale, center - scale, center


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(4, 64, 56, 56), (3, 4, 5, 7), (2, 4)], ids=shape_id)
def test_grid_bit_identical(shape, bits, dtype):
    x, scale, offset, center = affine(shape, bits)
    x = x.to(dtype)
    tri, ref = both(grid.grid_quantize, x, scale, offset, bits, center)
    assert_same_packed(tri, ref)
    assert torch.equal(*both(grid.grid_dequantize, ref))
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    u = x.float() * scale.view(per_channel) + offset.view(per_channel)  # rounded twice, as the kernel does
    mask_tri, mask_ref = both(grid.grid_positive, ref)
    assert torch.equal(mask_tri, mask_ref) and torch.equal(mask_tri, u > 0)


# --- bit packing, few-bit buckets, lookup-multiply --------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 1001, 2**20 + 3])
def test_pack_unpack_bit_identical(bits, n):
    g = torch.Generator(DEVICE).manual_seed(bits)
    codes = torch.randint(0, 2**bits, (n,), generator=g, device=DEVICE, dtype=torch.uint8)
    packed_tri, packed_ref = both(packing.pack_codes, codes, bits)
    assert torch.equal(packed_tri, packed_ref) and packed_tri.numel() == packing.packed_numel(n, bits)
    out_tri, out_ref = both(packing.unpack_codes, packed_ref, bits, n)
    assert torch.equal(out_tri, out_ref) and torch.equal(out_tri, codes)


def test_pack_bool_mask():
    mask = torch.rand(3, 1001, device=DEVICE) > 0.5
    packed_tri, packed_ref = both(packing.pack_codes, mask, 1)
    assert torch.equal(packed_tri, packed_ref)
    assert torch.equal(on("triton", packing.unpack_codes, packed_tri, 1, mask.numel()).bool(), mask.view(-1))


def borders_for(bits: int) -> torch.Tensor:
    return torch.sort(torch.randn(2**bits - 1, generator=torch.Generator().manual_seed(bits)))[0].to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_bucketize_bit_identical(bits, dtype):
    """Random values plus the borders, their roundings to dtype, +-0, +-inf and NaN."""
    borders = borders_for(bits)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan], device=DEVICE)
    x = torch.cat([sample((4, 5000)).view(-1), borders, borders.to(dtype).float(), special]).to(dtype)
    tri, ref = both(index.bucketize_pack, x, borders, bits)
    assert_same_packed(tri, ref)
    assert torch.equal(compress.decode(tri), torch.bucketize(x, borders).to(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bits", [1, 3])
def test_lookup_mul_bit_identical(bits, dtype):
    g = torch.Generator(DEVICE).manual_seed(7)
    x = torch.randn(16, 40, 33, generator=g, device=DEVICE)
    levels = torch.randn(2**bits, generator=g, device=DEVICE)
    grad = torch.randn(33, 40, 16, generator=g, device=DEVICE).to(dtype).transpose(0, 2)  # non-contiguous
    borders = borders_for(bits)
    p = on("reference", index.bucketize_pack, x, borders, bits)
    out_tri, out_ref = both(index.lookup_mul, p, levels, grad)
    expected = levels[torch.bucketize(x, borders)].to(dtype) * grad
    assert out_tri.dtype == dtype and out_tri.shape == grad.shape
    assert torch.equal(out_tri, out_ref) and torch.equal(out_tri, expected)


# --- nested forward-AD's fused kernel ---------------------------------------------------------------

ACTIVATIONS = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(), "mish": nn.Mish()}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", KINDS)
def test_value_and_derivative_matches_jvp(kind, dtype):
    x = torch.cat([torch.randn(100_000, device=DEVICE) * 4,
                   torch.tensor([0.0, 19.9, 20.1, -30.0, 30.0], device=DEVICE)]).to(dtype)
    y, d = value_and_derivative(x, kind)
    assert y.dtype == d.dtype == dtype and y.device == x.device
    xd = x.double()
    y0, d0 = torch.func.jvp(ACTIVATIONS[kind], (xd,), (torch.ones_like(xd),))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y.double(), y0, rtol=tol, atol=tol)
    torch.testing.assert_close(d.double(), d0, rtol=tol, atol=tol)
