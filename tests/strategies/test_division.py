"""DIVISION: exact forward on every model family, every Conv/BN input split, unbiased gradients."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from helpers import FORWARD_MODELS, mean_gradient_errors

from actmem import models, strategies
from actmem.core.errors import ConfigError, StrategyError
from actmem.measure import activation_bytes, saved_bytes_by_module
from actmem.strategies.layers import CompressedBatchNorm2d, CompressedConv2d, CompressedLinear, MaskedReLU

MODELS = FORWARD_MODELS


@pytest.mark.parametrize("name", MODELS)
def test_forward_is_bit_identical_in_train_and_eval(name):
    kw, shape = MODELS[name]
    torch.manual_seed(0)
    exact = models.build(name, num_classes=10, **kw)
    twin = strategies.apply(copy.deepcopy(exact), "division")
    assert any(isinstance(m, CompressedLinear) for m in twin.modules())
    x = torch.randn(shape)
    for _ in range(2):  # the second step sees updated running statistics
        assert torch.equal(exact(x), twin(x))
    for (n, be), bc in zip(exact.named_buffers(), twin.buffers()):
        assert torch.equal(be, bc), n
    exact.eval(), twin.eval()
    assert torch.equal(exact(x), twin(x))


def test_every_conv_and_bn_input_is_split():
    """resnet20 (CIFAR, batch 16): each Conv/BN keeps at most 1/8 of its input's bytes, each ReLU
    1/32; the whole model keeps over 10x less than exact (11.2x measured)."""
    torch.manual_seed(0)
    exact = models.build("resnet20", num_classes=10)
    twin = strategies.apply(copy.deepcopy(exact), "division")
    x = torch.randn(16, 3, 32, 32)
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0].numel() * 4))
             for n, m in twin.named_modules() if isinstance(m, (CompressedConv2d, CompressedBatchNorm2d, MaskedReLU))]
    saved = saved_bytes_by_module(twin, x)
    for h in hooks:
        h.remove()
    for n, nbytes in inputs.items():
        limit = nbytes / 32 if isinstance(twin.get_submodule(n), MaskedReLU) else nbytes / 8
        assert saved.get(n, 0) <= limit, n
    assert activation_bytes(exact, x) / sum(saved.values()) > 10


def test_compress_linear_false_keeps_linear_exact():
    torch.manual_seed(0)
    model = strategies.apply(models.build("resnet20", num_classes=10), "division", compress_linear=False)
    assert type(model.fc) is nn.Linear
    x = torch.randn(8, 3, 32, 32)
    assert saved_bytes_by_module(model, x)["fc"] == 8 * 64 * 4


def test_single_pixel_maps_are_kept_uncompressed():
    """A [N, C, 1, 1] input would grow under the split (bf16 mean + min/step per value)."""
    conv = strategies.apply(nn.Sequential(nn.Conv2d(16, 4, 1)), "division")
    x = torch.randn(8, 16, 1, 1)
    assert activation_bytes(conv, x) == x.numel() * 4


def test_gradients_are_unbiased():
    """The error of the mean gradient over k seeds falls like 1/sqrt(k): 16x the seeds, about 4x less
    error (no floor from a bias)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    few, many = mean_gradient_errors(model, torch.randn(4, 3, 16, 16), (8, 128), "division", bits=2)
    assert many < few / 3


def test_refusals():
    with pytest.raises(ConfigError, match="strategy.bits=9"):
        strategies.resolve("division", bits=9)
    with pytest.raises(ConfigError, match="strategy.block=0"):
        strategies.resolve("division", block=0)
    with pytest.raises(StrategyError, match="nothing to compress"):
        strategies.apply(nn.Sequential(nn.Flatten(), nn.GELU()), "division")
