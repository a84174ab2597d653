"""DIVISION's low/high-frequency split on both backends (Triton through its interpreter on CPU tensors)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined (import time)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from actmem.compress.errors import CompressError, NonFiniteError  # noqa: E402
from actmem.compress.packed import decode  # noqa: E402
from actmem.compress.packing import unpack_codes  # noqa: E402
from actmem.compress.split import _nearest_index, split_geometry, split_quantize  # noqa: E402

BACKENDS = ["reference", "triton"]
# divisible by 8; 28x28: 3x3 means that the nearest upsampling does not line up; 7x7: global pool;
# mixed; N = 1; a Linear's [N, F] and [N, T, F]; a single pixel; 100 rows: fp32(12 / 100) < 0.12
SHAPES = [(2, 3, 16, 16), (1, 2, 28, 28), (2, 2, 7, 7), (2, 3, 9, 13), (3, 20), (2, 3, 17), (1, 1, 1, 1),
          (1, 1, 100, 20)]


def on(backend, fn, *args, **kwargs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACTMEM_BACKEND", backend)
        return fn(*args, **kwargs)


def _x(shape, seed=0, dtype=torch.float32):
    """Noise plus a per-(sample, channel) level."""
    g = torch.Generator().manual_seed(seed)
    level = torch.rand(shape[:2] + (1,) * (len(shape) - 2), generator=g) * 4
    return (torch.randn(shape, generator=g) + level).to(dtype)


def _planes(p):
    P, H, W, kh, kw = split_geometry(p.shape, p.params["block"])
    hw8 = -(-H * W // 8) * 8
    q = unpack_codes(p.codes, p.bits, P * hw8).view(P, hw8)[:, : H * W].float()
    mn, step = p.meta[1].float().unbind(1)
    return P, H, W, kh, kw, q, mn[:, None], step[:, None]


def _expected_decode(p):
    """Independent decode: torch's nearest upsampling (the official F.upsample_nearest) + min + q * step."""
    P, H, W, kh, kw, q, mn, step = _planes(p)
    up = F.interpolate(p.meta[0].float()[:, None], size=(H, W), mode="nearest").view(P, H * W)
    return (up + (mn + q * step)).to(p.dtype).view(p.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_backends_agree_bit_for_bit(shape, dtype):
    bits = 1 + len(shape) % 3 + (dtype == torch.float16)  # 1..3 across the cases
    x = _x(shape, dtype=dtype)
    ref = on("reference", split_quantize, x, bits=bits, stochastic=False)
    tri = on("triton", split_quantize, x, bits=bits, stochastic=False)
    for a, b in zip(ref.tensors(), tri.tensors()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    expected = _expected_decode(ref)
    for backend in BACKENDS:
        out = on(backend, decode, ref)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, expected), backend


def test_fp64_input_is_rounded_to_fp32_on_both_backends():
    x = _x((2, 3, 9, 9), dtype=torch.float64)
    ref = on("reference", split_quantize, x, stochastic=False)
    tri = on("triton", split_quantize, x, stochastic=False)
    assert torch.equal(ref.codes, tri.codes) and torch.equal(ref.meta[1], tri.meta[1])
    assert torch.equal(on("triton", decode, ref), decode(ref)) and decode(ref).dtype == torch.float64


@pytest.mark.parametrize("shape", SHAPES[:4] + [(2, 3, 12, 4)])
def test_lfc_is_the_bf16_block_mean(shape):
    x = _x(shape, seed=1)
    p = split_quantize(x, block=8, stochastic=False)
    P, H, W, kh, kw = split_geometry(x.shape, 8)
    assert (kh, kw) == (min(8, H), min(8, W))
    mean = F.avg_pool2d(x.double().view(P, 1, H, W), (kh, kw)).float().bfloat16().view(P, H // kh, W // kw)
    assert torch.equal(p.meta[0], mean)


@pytest.mark.parametrize("block", [3, 8])
def test_upsampling_follows_torchs_nearest_rule(block):
    for size in range(1, 230):
        pooled = size // min(block, size)
        src = torch.arange(pooled, dtype=torch.float32).view(1, 1, pooled)
        expected = F.interpolate(src, size=size, mode="nearest").view(-1).long()
        assert torch.equal(_nearest_index(pooled, size, "cpu"), expected), size


def test_linear_input_is_pooled_along_its_last_dim():
    x = _x((4, 5, 24), seed=2)  # [N, T, F]: 20 rows of 24 features, 3 blocks each
    p = split_quantize(x, stochastic=False)
    assert p.meta[0].shape == (20, 1, 3) and p.meta[1].shape == (20, 2)
    assert torch.equal(p.meta[0], x.double().view(20, 1, 3, 8).mean(-1).float().bfloat16())


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_error_within_one_step(bits, stochastic):
    x = _x((2, 4, 12, 10), seed=bits)
    for backend in BACKENDS:
        p = on(backend, split_quantize, x, bits=bits, stochastic=stochastic, seed=5)
        P, H, W, kh, kw, q, mn, step = _planes(p)
        hfc = x.view(P, H * W) - F.interpolate(p.meta[0].float()[:, None], size=(H, W)).view(P, H * W)
        lo, hi = hfc.aminmax(dim=1)
        levels = 2**bits - 1
        assert (mn[:, 0] <= lo).all() and (mn[:, 0] > lo - lo.abs() / 2**7 - 1e-30).all()  # bf16 below min
        assert (mn + levels * step >= hi[:, None]).all()  # the grid covers the range ...
        assert (levels * step <= (hi[:, None] - mn) * (1 + 2**-7)).all()  # ... and barely more
        err = (on(backend, decode, p) - x).abs().view(P, H * W)
        slack = 1e-6 * x.abs().max()
        assert (err <= (step if stochastic else step / 2) + slack).all(), backend


@pytest.mark.parametrize("backend,seeds", [("reference", 400), ("triton", 100)])
def test_stochastic_rounding_is_unbiased(backend, seeds):
    x = _x((1, 2, 8, 12), seed=3)
    p = on(backend, split_quantize, x, bits=2, seed=0)
    step = p.meta[1].float()[:, 1].view(1, 2, 1, 1)
    total = torch.zeros_like(x, dtype=torch.float64)
    for seed in range(seeds):
        total += on(backend, decode, on(backend, split_quantize, x, bits=2, seed=seed))
    sigma = step / 2 / seeds**0.5  # each draw's variance is at most step^2 / 4
    assert ((total / seeds - x).abs() < 5 * sigma).all()
    # and the deterministic part is shared: the nearest rounding of the same x has the same lfc/stats
    det = on(backend, split_quantize, x, bits=2, stochastic=False)
    assert torch.equal(det.meta[0], p.meta[0]) and torch.equal(det.meta[1], p.meta[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds(backend):
    x = _x((2, 3, 8, 8), seed=4)
    a, b, c = (on(backend, split_quantize, x, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    torch.manual_seed(123)
    d = on(backend, split_quantize, x)
    torch.manual_seed(123)
    assert torch.equal(on(backend, split_quantize, x).codes, d.codes)  # None: torch's global RNG


@pytest.mark.parametrize("shape,bits,nbytes", [
    ((2, 3, 16, 16), 2, 6 * 2 * 32 + 6 * 4 * 2 + 6 * 4),  # codes + lfc (2x2 per plane, bf16) + min/step
    ((2, 2, 7, 7), 2, 4 * 2 * 7 + 4 * 2 + 4 * 4),  # 49 codes -> 7 blocks of 8; global pool: one mean
    ((2, 4, 56, 56), 2, 7088),  # 8 planes: 6272 + 784 + 32; 14.2x smaller than fp32 (100352 bytes)
    ((3, 20), 2, 3 * 2 * 3 + 3 * 2 * 2 + 3 * 4),
    ((2, 3, 17), 4, 6 * 4 * 3 + 6 * 2 * 2 + 6 * 4),
    ((1, 1, 1, 1), 2, 2 + 2 + 4),  # a single pixel takes more than its 4 bytes (see split.py)
])
def test_nbytes_is_exact(shape, bits, nbytes):
    p = split_quantize(torch.randn(shape), bits=bits)
    assert p.nbytes == nbytes
    assert sum(t.numel() * t.element_size() for t in p.tensors()) == nbytes  # no hidden storage


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_and_zero_planes_come_back_exactly(backend):
    x = torch.zeros(2, 3, 9, 9)
    x[1] = 1.5
    x[0, 1] = -0.25
    for stochastic in (False, True):
        p = on(backend, split_quantize, x, stochastic=stochastic)
        assert torch.equal(on(backend, decode, p), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    x = _x((3, 2, 10, 12), seed=5)
    xt = x.transpose(2, 3)
    a = on(backend, split_quantize, xt, stochastic=False)
    b = on(backend, split_quantize, xt.contiguous(), stochastic=False)
    assert torch.equal(a.codes, b.codes) and torch.equal(on(backend, decode, a), on(backend, decode, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_raise(backend, bad):
    x = torch.randn(2, 3, 8, 8)
    x[1, 2, 3, 4] = bad
    with pytest.raises(NonFiniteError, match=r"NaN, Inf .* \(1 of its 6 planes\)"):
        on(backend, split_quantize, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,nbytes", [((0, 3, 8, 8), 0), ((2, 3, 5, 0), 6 * 4), ((0, 4), 0)])
def test_empty(backend, shape, nbytes):
    p = on(backend, split_quantize, torch.randn(shape))
    assert p.nbytes == nbytes  # six empty planes still keep their min/step
    assert on(backend, decode, p).shape == shape


def test_rejects_bad_input():
    with pytest.raises(CompressError, match="2-D, 3-D or 4-D"):
        split_quantize(torch.randn(2, 2, 2, 2, 2))
    with pytest.raises(CompressError, match="floating-point"):
        split_quantize(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(CompressError, match="block=0"):
        split_quantize(torch.randn(2, 3), block=0)
