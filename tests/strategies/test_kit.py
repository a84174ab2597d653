"""The strategy kit carries a new method in a few dozen lines: uniform 8-bit inputs of every conv (one
min and step per sample), registered, checked, applied and measured like the shipped strategies."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from actmem import models, strategies
from actmem.compress.packed import Packed
from actmem.core.errors import ConfigError, StrategyError
from actmem.measure import activation_bytes
from actmem.strategies.layers import Codec, swap_layers

# ---- the whole strategy --------------------------------------------------------------------------


@dataclass
class Conv8Config:
    name: str = "conv8"
    bits: int = 8


def check_conv8(cfg) -> None:
    if not 1 <= cfg.bits <= 8:
        raise ConfigError(f"strategy.bits={cfg.bits}: conv8 keeps 1..8 bits per element.")


class PerSampleCodec(Codec):
    """Each sample on 2**bits - 1 steps between its min and max, rounded to nearest."""

    def __init__(self, bits: int):
        self.steps = 2**bits - 1

    def pack(self, x: torch.Tensor) -> Packed:
        flat = x.detach().float().flatten(1)
        lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
        step = ((hi - lo) / self.steps).clamp_min(torch.finfo(torch.float32).tiny)
        codes = ((flat - lo) / step).round_().to(torch.uint8)
        return Packed(codes.flatten(), (lo, step), x.shape, x.dtype, 8, "conv8")

    def unpack(self, p: Packed) -> torch.Tensor:
        lo, step = p.meta
        return (p.codes.view(p.shape[0], -1).float() * step + lo).to(p.dtype).view(p.shape)


def apply_conv8(model: nn.Module, cfg) -> nn.Module:
    codec = PerSampleCodec(cfg.bits)
    if not swap_layers(model, lambda name, m: codec if isinstance(m, nn.Conv2d) else None):
        raise StrategyError(f"conv8 found no Conv2d in {type(model).__name__}.")
    return model


# ---- what every strategy passes ----------------------------------------------------------------------


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(strategies.STRATEGIES, "_entries", dict(strategies.STRATEGIES._entries))
    strategies.STRATEGIES.register("conv8", schema=Conv8Config, check=check_conv8)(apply_conv8)


def test_a_kit_strategy_keeps_the_forward_and_compresses_like_actnn_at_8_bits(registered):
    torch.manual_seed(0)
    exact = models.build("resnet20", num_classes=10)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    conv8 = strategies.apply(models.build("resnet20", num_classes=10), "conv8")
    conv8.load_state_dict(exact.state_dict())  # same keys: the swapped convs are the convs
    assert torch.equal(conv8(x), exact(x))
    conv8(x).square().sum().backward()
    exact(x).square().sum().backward()
    cos = torch.nn.functional.cosine_similarity(conv8.conv1.weight.grad.flatten(), exact.conv1.weight.grad.flatten(), 0)
    assert cos > 0.999  # 8-bit inputs: weight gradients close, not equal
    actnn8 = strategies.apply(models.build("resnet20", num_classes=10), "actnn", level="L1", bits=8)
    exact_bytes, conv8_bytes = activation_bytes(exact, x), activation_bytes(conv8, x)
    assert conv8_bytes <= activation_bytes(actnn8, x)  # same codes, less metadata than groups of 256
    assert exact_bytes / conv8_bytes > 1.5


def test_a_kit_strategy_refuses_bad_settings_before_a_model_is_built(registered):
    with pytest.raises(ConfigError, match="strategy.bits=9"):
        strategies.resolve("conv8", bits=9)
    with pytest.raises(StrategyError, match="no Conv2d"):
        strategies.apply(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "conv8")
