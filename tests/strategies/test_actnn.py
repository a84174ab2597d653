"""ActNN: exact forward on every model family, what each level compresses, the greedy allocation
(against the official heap), L3's per-sample/per-layer budgets, unbiased gradients, refusals."""
from __future__ import annotations

import copy
import heapq

import pytest
import torch
import torch.nn as nn
from helpers import FORWARD_MODELS, mean_gradient_errors

from actmem import models, strategies
from actmem.core.errors import ConfigError, StrategyError
from actmem.measure import activation_bytes, saved_bytes_by_module
from actmem.strategies.actnn import BitAllocator, GroupCodec, greedy_bits
from actmem.strategies.layers import CompressedBatchNorm2d, CompressedConv2d, MaskedReLU

MODELS = FORWARD_MODELS


@pytest.mark.parametrize("name", MODELS)
def test_forward_is_bit_identical_in_train_and_eval(name):
    kw, shape = MODELS[name]
    torch.manual_seed(0)
    exact = models.build(name, num_classes=10, **kw)
    twin = strategies.apply(copy.deepcopy(exact), "actnn")
    x = torch.randn(shape)
    out_c = twin(x)
    assert torch.equal(exact(x), out_c)
    out_c.sum().backward()
    assert torch.equal(exact(x), twin(x))  # with reallocated budgets and updated statistics
    for (n, be), bc in zip(exact.named_buffers(), twin.buffers()):
        assert torch.equal(be, bc), n
    exact.eval(), twin.eval()
    assert torch.equal(exact(x), twin(x))


def test_levels_compress_more_and_more():
    torch.manual_seed(0)
    exact = models.build("resnet20", num_classes=10)
    x = torch.randn(16, 3, 32, 32)
    twins = {lv: strategies.apply(copy.deepcopy(exact), "actnn", level=lv) for lv in ("L0", "L1", "L2", "L3")}
    assert type(twins["L0"].conv1) is nn.Conv2d and isinstance(twins["L0"].relu, MaskedReLU)
    assert isinstance(twins["L1"].conv1, CompressedConv2d) and type(twins["L1"].bn1) is nn.BatchNorm2d
    assert isinstance(twins["L2"].bn1, CompressedBatchNorm2d) and twins["L2"].bn1.codec.bits == 4
    exact_bytes, *sizes = [activation_bytes(m, x) for m in (exact, *twins.values())]
    assert abs(sizes[0] / exact_bytes - 1) < 0.01  # L0 adds masks where exact shares a ReLU's output
    assert sizes == sorted(sizes, reverse=True) and exact_bytes / sizes[-1] > 11  # 12.3x measured


def test_every_conv_and_bn_input_is_quantized():
    """resnet18 at L3 (first step: 2 bits everywhere): each Conv/BN keeps 2.13 bits per input value
    (2 bits + bf16 min and step per 256), a BN also its batch mean and inverse std."""
    torch.manual_seed(0)
    twin = strategies.apply(models.build("resnet18", num_classes=10), "actnn")
    x = torch.randn(8, 3, 32, 32)
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0]))
             for n, m in twin.named_modules() if isinstance(m, (CompressedConv2d, CompressedBatchNorm2d))]
    saved = saved_bytes_by_module(twin, x)
    for h in hooks:
        h.remove()
    assert len(inputs) == 20 + 20  # 17 convs + 3 shortcut convs, as many BNs
    for n, t in inputs.items():
        stats = 2 * 4 * t.shape[1] if "bn" in n or "shortcut.1" in n else 0
        assert saved[n] <= t.numel() * 2.13 / 8 + stats, n


def _heap_bits(cost, weight, target):
    """The official calc_precision.cc, transcribed: pop the smallest increase per bit until on budget."""
    bits = [8] * len(cost)
    total = 8 * sum(weight)
    obj = lambda c, b: c * (1 / ((1 << (b - 1)) - 1) ** 2 - 1 / ((1 << b) - 1) ** 2)  # noqa: E731
    heap = [(obj(c, 8) / w, i) for i, (c, w) in enumerate(zip(cost, weight))]
    heapq.heapify(heap)
    while total > target:
        _, i = heapq.heappop(heap)
        bits[i] -= 1
        total -= weight[i]
        if bits[i] > 1:
            heapq.heappush(heap, (obj(cost[i], bits[i]) / weight[i], i))
    return bits


@pytest.mark.parametrize("budget", [1.0, 1.7, 2.0, 3.3, 8.0])
def test_greedy_matches_the_official_heap(budget):
    torch.manual_seed(0)
    cost = torch.rand(40).double() ** 4 * 100  # spread over orders of magnitude
    weight = torch.randint(1, 50, (40,))
    target = int(budget * int(weight.sum()))
    bits = greedy_bits(cost, weight, target)
    assert bits.tolist() == _heap_bits(cost.tolist(), weight.tolist(), target)
    assert int((bits * weight).sum()) <= target and bits.min() >= 1 and bits.max() <= 8


def test_l3_budgets_follow_ranges_and_gradients():
    """First step: every layer at the average budget; the wide-range sample gets more bits than the
    others. After a backward, budgets differ by layer and average to `bits` over all elements."""
    torch.manual_seed(0)
    model = strategies.apply(models.build("resnet20", num_classes=10), "actnn", bits=2)
    allocator = model.conv1.codec.allocator
    assert isinstance(allocator, BitAllocator)
    x = torch.randn(8, 3, 32, 32)
    x[3] *= 20
    seen = {}
    quantize = strategies.actnn.compress.quantize

    def spy(t, bits, group_size):
        seen.setdefault("bits", bits)
        return quantize(t, bits, group_size)

    strategies.actnn.compress.quantize = spy
    try:
        model(x).square().mean().backward()
    finally:
        strategies.actnn.compress.quantize = quantize
    assert all(c.budget == 2 for c in allocator.owners)
    assert seen["bits"][3] == seen["bits"].max() > 2 and seen["bits"].sum() <= 16
    model(x).square().mean().backward()
    budgets = torch.tensor([c.budget for c in allocator.owners])
    elements = torch.tensor([c.dim + c.borrowed for c in allocator.owners], dtype=torch.float64)
    assert budgets.std() > 0.1
    assert float((budgets * elements).sum() / elements.sum()) <= 2.0


@pytest.mark.parametrize("level", ["L2", "L3"])
def test_gradients_are_unbiased(level):
    """The error of the mean gradient over k seeds falls like 1/sqrt(k): 16x the seeds, about 4x less
    error (no floor from a bias)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    few, many = mean_gradient_errors(model, torch.randn(4, 3, 16, 16), (8, 128), "actnn", level=level, bits=2)
    assert many < few / 3


def test_uniform_codec_and_refusals():
    model = strategies.apply(models.build("resnet20", num_classes=10), "actnn", level="L1", bits=8)
    assert isinstance(model.conv1.codec, GroupCodec) and model.conv1.codec.bits == 8
    # bad settings are refused when the config is resolved, before any model is built
    with pytest.raises(ConfigError, match="strategy.bits=3: at L2 it is a uniform width"):
        strategies.resolve("actnn", level="L2", bits=3)
    with pytest.raises(ConfigError, match="strategy.level='L4'.*L3.1"):
        strategies.resolve("actnn", level="L4")
    with pytest.raises(ConfigError, match="strategy.bits: actnn level L0"):
        strategies.resolve("actnn", level="L0", bits=2)
    with pytest.raises(ConfigError, match="strategy.bits=9: at L3 it is the average budget"):
        strategies.resolve("actnn", bits=9)
    with pytest.raises(ConfigError, match="strategy.group_size=12"):
        strategies.resolve("actnn", group_size=12)
    with pytest.raises(StrategyError, match="nothing to compress"):
        strategies.apply(nn.Sequential(nn.Flatten(), nn.GELU()), "actnn")
