"""BLPA's fixed grid: codes, midpoints and the exact ReLU mask, on both backends (Triton through its
interpreter on CPU tensors)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined (import time)

import pytest  # noqa: E402
import torch  # noqa: E402

from actmem.compress.errors import CompressError  # noqa: E402
from actmem.compress.grid import grid_positive, grid_quantize, grid_shift, grid_step  # noqa: E402
from actmem.compress.packed import decode  # noqa: E402

BACKENDS = ["reference", "triton"]


def on(backend, fn, *args, **kwargs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACTMEM_BACKEND", backend)
        return fn(*args, **kwargs)


def _affine(shape, seed):
    """x and per-channel scale (1/std), offset, center (beta/gamma) as a BN layer would give them."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g) * 3 + 1
    scale = torch.rand(C, generator=g) * 0.5 + 0.2
    center = torch.randn(C, generator=g) * 2
    center[0] = 40.0  # far above the grid's reach: shift clips at 1
    center[-1] = -40.0  # far below: shift clips at 2**bits - 1
    offset = -scale + center
    return x, scale, offset, center


def _u(x, scale, offset):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x.float() * scale.view(shape) + offset.view(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (1, 4, 9), (2, 4), (2, 3, 2, 3, 3)])
def test_backends_agree_bit_for_bit(shape, bits, dtype):
    x, scale, offset, center = _affine(shape, bits)
    x = x.to(dtype)
    ref = on("reference", grid_quantize, x, scale, offset, bits, center)
    tri = on("triton", grid_quantize, x, scale, offset, bits, center)
    assert torch.equal(ref.codes, tri.codes) and torch.equal(ref.meta[0], tri.meta[0])
    n = x.numel()
    assert ref.nbytes == bits * ((n + 7) // 8) + shape[1]  # codes + one uint8 shift per channel
    u = _u(x, scale, offset)
    for backend in BACKENDS:
        u_hat = on(backend, decode, ref)
        assert u_hat.dtype == dtype and u_hat.shape == x.shape
        assert torch.equal(u_hat, on("reference", decode, ref))
        assert torch.equal(on(backend, grid_positive, ref), u > 0)


def _codes(p):
    """The integer codes, recovered from the midpoints (exact in fp32)."""
    shift = p.meta[0].float().view((1, -1) + (1,) * (len(p.shape) - 2))
    return (decode(p).float() / grid_step(p.bits) - 0.5 + shift).round().long()


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_follow_the_official_formula(bits):
    """Away from bin edges: clip(floor((u - 1e-6) / Delta) + shift),
    shift = max(1, 2**(K-1) - floor(c / Delta))."""
    x, scale, offset, center = _affine((4, 6, 8, 8), seed=3)
    p = grid_quantize(x, scale, offset, bits, center)
    nbins, delta = 2**bits, 6.0 / 2**bits
    shift = torch.clamp(nbins // 2 - torch.floor(center.double() / delta), min=1).view(1, -1, 1, 1)
    u = _u(x, scale, offset).double()
    official = torch.clamp(torch.floor((u - 1e-6) / delta) + shift, 0, nbins - 1).long()
    frac = torch.remainder(u / delta, 1.0)
    clear = (frac > 1e-4) & (frac < 1 - 1e-4) & (shift < nbins)  # off the edges, official shift in range
    assert clear.float().mean() > 0.5
    assert torch.equal(_codes(p)[clear], official[clear])


def test_shift_centres_the_grid_and_is_clipped():
    center = torch.tensor([0.0, 0.3, -0.3, 1.0, 40.0, -40.0])
    assert grid_shift(center, 4).tolist() == [8, 8, 9, 6, 1, 15]  # floor(c / 0.375)
    assert grid_shift(center, 8).tolist() == [128, 116, 141, 86, 1, 255]  # floor(c / 0.0234375)
    assert grid_shift(torch.zeros(1), 1).tolist() == [1]


def _edge_u(bits):
    """u right at, just above and just below 0 and the bin edges, tiny and huge values."""
    delta = grid_step(bits)
    tiny = [0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.2e-38, -1.2e-38, 1e-7, -1e-7, 1e-6, -1e-6, 2e-6, -2e-6]
    edges = torch.arange(-2**bits, 2**bits + 1, dtype=torch.float32) * delta
    near = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)])
    return torch.cat([torch.tensor(tiny + [1e30, -1e30, 3.0e38, -3.0e38]), near])


@pytest.mark.filterwarnings("ignore:overflow encountered")  # u = 3e38 on purpose
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_mask_is_exact_at_zero_and_edges(bits):
    u = _edge_u(bits)
    n = u.numel()
    x = u.view(1, 1, n).expand(1, 3, n).contiguous()  # one channel per center below
    one, zero = torch.ones(3), torch.zeros(3)
    center = torch.tensor([0.0, 40.0, -40.0])  # shift mid-range, at 1 and at 2**bits - 1
    for backend in BACKENDS:
        p = on(backend, grid_quantize, x, one, zero, bits, center)
        assert torch.equal(on(backend, grid_positive, p), x > 0), backend


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_midpoints_within_half_a_step(bits):
    x, scale, offset, center = _affine((2, 5, 6, 6), seed=bits)
    p = grid_quantize(x, scale, offset, bits, center)
    u, u_hat = _u(x, scale, offset), decode(p)
    delta = grid_step(bits)
    shift = p.meta[0].float().view(1, -1, 1, 1)
    lo, hi = -shift * delta, (2**bits - shift) * delta  # the grid's reach
    inside = (u > lo) & (u <= hi)
    assert inside.float().mean() > 0.5
    assert ((u_hat - u).abs()[inside] <= delta / 2).all()
    assert torch.equal(u_hat[u <= lo], (lo + delta / 2).expand_as(u)[u <= lo])  # clipped to the end bins
    assert torch.equal(u_hat[u > hi], (hi - delta / 2).expand_as(u)[u > hi])


def test_deterministic_and_non_contiguous():
    x, scale, offset, center = _affine((4, 3, 5, 6), seed=0)
    xt = x.transpose(2, 3)
    a = grid_quantize(xt, scale, offset, 4, center)
    b = grid_quantize(xt.contiguous(), scale, offset, 4, center)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(on("triton", grid_quantize, xt, scale, offset, 4, center).codes, a.codes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0)])
def test_empty(backend, shape):
    p = on(backend, grid_quantize, torch.randn(shape), torch.ones(3), torch.zeros(3), 4)
    assert p.nbytes == 3  # just the shifts
    assert on(backend, decode, p).shape == shape and on(backend, grid_positive, p).shape == shape


def test_rejects_bad_shapes():
    with pytest.raises(CompressError, match="scale has 2 values for 3 channels"):
        grid_quantize(torch.randn(2, 3, 4), torch.ones(2), torch.zeros(3), 4)
    with pytest.raises(CompressError, match=r"\[N, C, \.\.\.\]"):
        grid_quantize(torch.randn(5), torch.ones(1), torch.zeros(1), 4)
