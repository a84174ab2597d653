"""The torch references of group quantization and of DIVISION's split work slab by slab: apart from
their outputs, no temporary larger than a slab or two is alive, whatever the input's size.

Measured with the profiler's allocation record (every CPU allocation and free, in time order): the
peak of the running sum of allocated bytes during one call, less the bytes of what the call returns.
"""
import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from actmem.compress.packing import pack_codes, unpack_codes
from actmem.compress.quant import SLAB, dequantize, quantize
from actmem.compress.split import split_dequantize, split_quantize

# A slab's working set, in float32 slabs of SLAB elements (1 MiB): quantize holds the scaled values,
# the random draws as int64 and as float32 (2.5), plus the slab itself where its groups are padded
# (a copy); split_quantize sums its blocks in float64 (a 2-slab copy) next to its high-frequency part;
# the decoders hold one or two. Measured: 1.5 to 3.9 MiB. 6 slabs leave room for the uint8 codes and
# the per-group temporaries; the whole-input temporaries this guards against are 10 to 70 MB here.
BOUND = 6 * SLAB * 4
SHAPE = (16, 256, 56, 56)  # float32: 49 MiB
WIDTHS = torch.tensor([2, 1, 8, 4, 2, 3, 5, 1, 8, 2, 7, 6, 4, 4, 1, 2])


def peak_growth(fn):
    """(fn(), the most bytes that were allocated and not yet freed at any time while fn ran)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    stack, sizes = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            sizes.append((e.start_time_ns, e.extra_fields.alloc_size))  # frees are negative
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return out, peak


@pytest.fixture(autouse=True)
def reference_on_one_thread(monkeypatch):
    """The torch reference, on one thread: the allocations do not depend on it, and the slabs' many
    small operations stay fast on a busy machine (two threads competing for cores: many times slower)."""
    monkeypatch.setenv("ACTMEM_BACKEND", "reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def x():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def padded(x):
    """x's values as 16 samples of 802815 = 3136 * 256 - 1 = 12544 * 64 - 1: every last group is partial."""
    return x.view(-1)[: 16 * (x[0].numel() - 1)].view(16, -1)


CASES = {
    "2 bits": (lambda x: x, dict(bits=2, seed=1)),
    "8 bits, nearest": (lambda x: x, dict(bits=8, stochastic=False)),
    "per-sample widths": (lambda x: x, dict(bits=WIDTHS, seed=1)),
    "padded groups": (padded, dict(bits=4, seed=1)),
    "padded, per-sample widths, groups of 64": (padded, dict(bits=WIDTHS, group_size=64, seed=1)),
}


@pytest.mark.parametrize("case", CASES)
def test_quantize_temporaries(x, case):
    view, kwargs = CASES[case]
    xin = view(x)
    p, peak = peak_growth(lambda: quantize(xin, **kwargs))
    assert p.nbytes <= peak <= p.nbytes + BOUND, (peak - p.nbytes, BOUND)
    y, peak = peak_growth(lambda: dequantize(p))
    out = y.untyped_storage().nbytes()
    assert y.shape == xin.shape and out == xin.numel() * 4
    assert out <= peak <= out + BOUND, (peak - out, BOUND)


@pytest.mark.parametrize("shape,bits", [(SHAPE, 2), ((16, 256, 3136), 4), ((8192, 777), 1)])
def test_split_temporaries(x, shape, bits):
    """4-D planes of 56 x 56; 3-D rows of 3136; [N, F] rows of 777 codes (not a multiple of 8)."""
    xin = x.view(-1)[: torch.Size(shape).numel()].view(shape)
    p, peak = peak_growth(lambda: split_quantize(xin, 8, bits, seed=1))
    assert p.nbytes <= peak <= p.nbytes + BOUND, (peak - p.nbytes, BOUND)
    y, peak = peak_growth(lambda: split_dequantize(p))
    out = y.untyped_storage().nbytes()
    assert out == xin.numel() * 4 and out <= peak <= out + BOUND, (peak - out, BOUND)


def test_pack_codes_transposes_in_chunks(x):
    """pack_codes copies the codes into blocks (its input's size) and transposes them a 256 KiB chunk
    at a time: no int64 temporary as large as the blocks; chunk boundaries change no bit."""
    chunk = 8 << 15  # bytes: 2^15 int64 words
    n = 3 * chunk + 5  # codes: 3 chunks and a partial block
    codes = (x.view(-1)[:n].abs() * 3).to(torch.uint8).clamp_max_(7)
    packed, peak = peak_growth(lambda: pack_codes(codes, 3))
    assert packed.numel() <= peak <= packed.numel() + (n + 8) + chunk + 4096, peak - packed.numel()
    assert torch.equal(unpack_codes(packed, 3, n), codes)
    bit = (codes[: n - 5].view(-1, 8).long() >> torch.arange(3).view(3, 1, 1)) & 1  # [bit, block, code]
    oracle = (bit << torch.arange(8)).sum(2).to(torch.uint8).t().reshape(-1)  # byte j of a block: bit j
    assert torch.equal(packed[: oracle.numel()], oracle)
