"""Group quantization (ActNN): error bounds per group, unbiased stochastic rounding, exact sizes, edge
cases, and the Triton kernels (through the interpreter on CPU tensors) against the torch reference."""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined (import time)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from actmem import compress  # noqa: E402
from actmem.compress import CompressError, NonFiniteError  # noqa: E402

BACKENDS = ["reference", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, group_size): N=1, odd sizes, sizes not divisible by the group, 2-D/3-D/4-D
CASES = [((1, 37), 256), ((3, 300), 256), ((2, 3, 50), 64), ((2, 3, 5, 7), 16), ((4, 256), 256)]
# relative rounding up of the stored step: bf16 keeps 8 significant bits, fp16 11
STEP_SLACK = {torch.float32: 2**-7, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def on(backend, fn, *args, **kwargs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACTMEM_BACKEND", backend)
        return fn(*args, **kwargs)


def sample(shape, dtype, seed=0):
    """Samples with different offsets and spreads (one narrow, one far from 0), so groups differ."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.arange(shape[0]) % 4
    spread = torch.tensor([3.0, 1e-3, 40.0, 0.5])[pick].view(-1, *[1] * (len(shape) - 1))
    offset = torch.tensor([1.0, -2.0, 100.0, 0.0])[pick].view_as(spread)
    return (torch.randn(shape, generator=g) * spread + offset).to(dtype)


def grouped(t, samples, group_size):
    """t's groups as float64 [samples * G, group_size], NaN past each sample's end."""
    t = t.reshape(samples, -1).double()
    G = -(-t.shape[1] // group_size)
    return F.pad(t, (0, G * group_size - t.shape[1]), value=math.nan).view(-1, group_size)


def check_bounds(x, p, group_size, stochastic):
    """The documented guarantees, group by group: the stored grid covers [min, max], its step is
    (max - lo) / (2^b - 1) up to the metadata's rounding, and |x - x_hat| <= step (nearest: step / 2).
    Returns x_hat."""
    x_hat = compress.dequantize(p)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype and x_hat.device == x.device
    N = x.shape[0] if p.params["per_sample"] and x.dim() >= 2 else 1
    xg, hg = grouped(x, N, group_size), grouped(x_hat, N, group_size)
    real = ~xg.isnan()
    gmin = torch.where(real, xg, math.inf).amin(1, keepdim=True)
    gmax = torch.where(real, xg, -math.inf).amax(1, keepdim=True)
    lo, step = (m.double().reshape(-1, 1) for m in p.meta[:2])
    widths = p.meta[2].long() if len(p.meta) == 3 else torch.full((N,), p.bits)
    levels = (2**widths - 1).double().repeat_interleave(xg.shape[0] // N).view(-1, 1)

    assert (lo <= gmin).all() and (lo + levels * step >= gmax).all()  # the grid covers the group
    assert (gmin - lo <= gmin.abs() * 2**-7).all()  # lo is the min rounded down, no lower
    if x.dtype != torch.float32:
        assert torch.equal(lo, gmin)  # fp16/bf16 metadata holds their min exactly
    slack = STEP_SLACK[x.dtype]
    assert (step <= (gmax - lo) / levels * (1 + slack) + 2**-24).all()

    k = 1.0 if stochastic else 0.5
    # rounding x_hat to the output dtype, and the float32 arithmetic of lo + q * step
    tol = hg.nan_to_num().abs() * torch.finfo(x.dtype).eps + (lo.abs() + levels * step) * 2**-22
    err = torch.where(real, (xg - hg).abs(), 0.0)
    assert (err <= k * step + tol).all()
    # the form, range / (2^b - 1), with only the metadata's rounding as slack
    assert (err <= k * (gmax - lo) / levels * (1 + slack) + 2**-24 + tol).all()
    return x_hat


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,group_size", CASES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("stochastic", [True, False])
def test_error_bounds_per_group(backend, dtype, shape, group_size, bits, stochastic):
    x = sample(shape, dtype)
    p = on(backend, compress.quantize, x, bits, group_size, stochastic=stochastic, seed=1)
    G = -(-x[0].numel() // group_size)
    assert p.layout == "group" and p.meta[0].shape == p.meta[1].shape == (shape[0], G)
    on(backend, check_bounds, x, p, group_size, stochastic)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,group_size", CASES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_triton_matches_reference(dtype, shape, group_size, bits):
    """Nearest rounding: bit-identical codes and metadata; the same codes: identical values."""
    x = sample(shape, dtype, seed=bits)
    ref = on("reference", compress.quantize, x, bits, group_size, stochastic=False)
    tri = on("triton", compress.quantize, x, bits, group_size, stochastic=False)
    assert torch.equal(tri.codes, ref.codes)
    assert all(torch.equal(a, b) for a, b in zip(tri.meta, ref.meta))
    assert torch.equal(on("triton", compress.dequantize, ref), on("reference", compress.dequantize, ref))
    noisy = on("reference", compress.quantize, x, bits, group_size, seed=2)
    assert torch.equal(on("triton", compress.dequantize, noisy), on("reference", compress.dequantize, noisy))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [1, 2, 8])
def test_stochastic_rounding_is_unbiased(backend, bits):
    """Every value rounds to one of its two neighbours on the grid (so the error is below a step),
    up with probability frac((x - lo) / step): the mean over draws converges to x."""
    K, n, group_size = 512, 100, 32
    x = sample((1, n), torch.float32, seed=3)
    draws = x.expand(K, n)  # K samples with identical data: K independent roundings in one call
    p = on(backend, compress.quantize, draws, bits, group_size, seed=4)
    lo, step = (m.double()[0].repeat_interleave(group_size)[:n] for m in p.meta[:2])
    v = (x[0].double() - lo) / step
    q = (on(backend, compress.dequantize, p).double() - lo) / step  # the codes, from x_hat
    q = q.round()
    assert ((q == v.floor()) | (q == v.floor() + 1)).all()
    up = (q - v.floor()).mean(0)  # empirical P(round up)
    sigma = (v.frac() * (1 - v.frac()) / K).sqrt()
    assert ((up - v.frac()).abs() <= 5 * sigma + 1e-3).all()
    assert abs(float((up - v.frac()).mean())) < 4 * float(sigma.square().mean().sqrt()) / math.sqrt(n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds(backend):
    x = sample((2, 300), torch.float32)
    codes = lambda **kw: on(backend, compress.quantize, x, 2, **kw).codes
    assert torch.equal(codes(seed=5), codes(seed=5))
    assert not torch.equal(codes(seed=5), codes(seed=6))
    torch.manual_seed(7)
    first = codes()
    torch.manual_seed(7)
    assert torch.equal(codes(), first)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_nbytes_exact(dtype, bits):
    """b bits per value plus two 16-bit numbers per group of 256: b + 1/8 bits per value."""
    x = torch.randn(4, 3, 16, 16).to(dtype)  # 768 values per sample: 3 groups
    p = compress.quantize(x, bits)
    expected = {1: 1.125, 2: 2.125, 4: 4.125, 8: 8.125}[bits] / 8 * x.numel()
    assert p.nbytes == expected == x.numel() * bits // 8 + 4 * 4 * 3
    if bits == 2 and dtype == torch.float32:
        assert p.nbytes / (x.numel() * 4) == 2.125 / 32 <= 2.13 / 32
    # a padded last group holds whole codes too: 300 values -> 2 groups of 256
    assert compress.quantize(torch.randn(3, 300).to(dtype), bits).nbytes == 3 * (2 * 256 * bits // 8 + 2 * 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_widths(backend):
    """ActNN's mixed precision: each sample at its own width, packed densely at that width."""
    x = sample((5, 3, 7, 9), torch.float32)  # 189 values: 3 groups of 64 per sample
    widths = torch.tensor([2, 8, 1, 2, 3])
    p = on(backend, compress.quantize, x, widths, 64, stochastic=False)
    assert p.bits == 8 and torch.equal(p.meta[2], widths.to(torch.uint8))
    assert p.nbytes == int(widths.sum()) * 3 * 64 // 8 + 5 * 3 * 4 + 5
    x_hat = on(backend, check_bounds, x, p, 64, stochastic=False)
    for n, b in enumerate(widths.tolist()):  # each sample alone, at its width: the same values
        alone = on("reference", compress.quantize, x[n : n + 1], torch.tensor([b]), 64, stochastic=False)
        assert torch.equal(on("reference", compress.dequantize, alone), x_hat[n : n + 1])
    ref = on("reference", compress.quantize, x, widths, 64, stochastic=False)
    assert torch.equal(p.codes, ref.codes)
    noisy = on(backend, compress.quantize, x, widths, 64, seed=1)
    on(backend, check_bounds, x, noisy, 64, stochastic=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_stay_within_samples(backend):
    """Per sample, a sample's groups see only its values; per_sample=False flattens the tensor."""
    x = torch.cat([torch.randn(1, 300) * 1e4, torch.randn(1, 300) * 1e-2])
    p = on(backend, compress.quantize, x, 4, stochastic=False)
    assert p.meta[0].shape == (2, 2)
    assert (on(backend, compress.dequantize, p)[1] - x[1]).abs().max() < 1e-2
    flat = on(backend, compress.quantize, x, 4, per_sample=False, stochastic=False)
    assert flat.meta[0].shape == (1, 3)  # 600 values, groups of 256 across the two samples
    on(backend, check_bounds, x, flat, 256, stochastic=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_does_not_widen_the_last_group(backend):
    """All-positive values, exact in bf16: a zero pad would pull lo to 0; lo must be the min."""
    x = 5 + torch.randint(0, 32, (2, 300), generator=torch.Generator().manual_seed(0)) / 32
    p = on(backend, compress.quantize, x, 2)
    tail = x[:, 256:]
    assert torch.equal(p.meta[0][:, 1].float(), tail.amin(1))
    on(backend, check_bounds, x, p, 256, stochastic=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stochastic", [True, False])
def test_constant_groups(backend, dtype, stochastic):
    """Range 0: step 0, code 0, and x back exactly when the metadata dtype holds the value (the
    only kind for fp16/bf16 input); an fp32 value it cannot hold comes back within its tiny step."""
    values = [0.0, 1.5, -3.25, 1000.0]
    x = torch.tensor(values).repeat_interleave(64).view(1, -1).to(dtype)
    p = on(backend, compress.quantize, x, 2, 64, stochastic=stochastic)
    assert (p.meta[1] == 0).all()
    assert torch.equal(on(backend, compress.dequantize, p), x)
    odd = torch.full((1, 64), 0.1, dtype=dtype)
    p = on(backend, compress.quantize, odd, 8, 64, stochastic=stochastic)
    x_hat = on(backend, compress.dequantize, p)
    assert (x_hat.double() - odd.double()).abs().max() <= 0.1 * 2**-7 / 255 + 0.1 * torch.finfo(dtype).eps


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused(backend, bad):
    x = torch.randn(2, 100)
    x[1, 37] = bad
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        on(backend, compress.quantize, x, 2)
    on(backend, compress.quantize, x, 2, check=False)  # the caller's choice: no test, no error


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (2, 0, 4)])
def test_empty(backend, shape):
    x = torch.empty(shape)
    p = on(backend, compress.quantize, x, 2)
    assert p.nbytes == 0
    x_hat = on(backend, compress.dequantize, p)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    base = sample((4, 6, 50), torch.float32)
    for x in (base.transpose(1, 2), base[:, ::2], base.permute(2, 0, 1)):
        assert not x.is_contiguous()
        p = on(backend, compress.quantize, x, 4, stochastic=False)
        q = on(backend, compress.quantize, x.contiguous(), 4, stochastic=False)
        assert torch.equal(p.codes, q.codes)
        assert torch.equal(on(backend, compress.dequantize, p), on(backend, compress.dequantize, q))


def test_one_dimensional_is_one_sample():
    x = torch.randn(300)
    p = compress.quantize(x, 2)
    assert p.meta[0].shape == (1, 2) and compress.dequantize(p).shape == (300,)


@pytest.mark.parametrize("bits", [0, 3, 16, 2.5, True])
def test_bad_width(bits):
    with pytest.raises(CompressError, match="valid widths: 1, 2, 4, 8"):
        compress.quantize(torch.randn(2, 8), bits)


@pytest.mark.parametrize(
    "widths,kwargs,match",
    [
        (torch.tensor([2, 4, 8]), {}, "2 widths"),
        (torch.tensor([2.0, 4.0]), {}, "integer"),
        (torch.tensor([0, 4]), {}, "1..8"),
        (torch.tensor([2, 9]), {}, "1..8"),
        (torch.tensor([2, 4]), {"per_sample": False}, "per_sample=True"),
    ],
)
def test_bad_per_sample_widths(widths, kwargs, match):
    with pytest.raises(CompressError, match=match):
        compress.quantize(torch.randn(2, 8), widths, **kwargs)


def test_bad_group_size_and_dtype():
    with pytest.raises(CompressError, match="multiple of 8"):
        compress.quantize(torch.randn(2, 8), 2, group_size=12)
    with pytest.raises(CompressError, match="float32, float16 or bfloat16"):
        compress.quantize(torch.arange(8), 2)
