"""Recomputation: same forward, same gradients, BatchNorm statistics updated once, fewer bytes kept."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from actmem import models, strategies
from actmem.core.errors import ConfigError, StrategyError
from actmem.measure import activation_bytes
from actmem.strategies.checkpoint import Checkpointed


def _pair(name: str, granularity: str, **kw):
    torch.manual_seed(0)
    exact = models.build(name, num_classes=10, **kw)
    ckpt = strategies.apply(copy.deepcopy(exact), "checkpoint", granularity=granularity)
    return exact, ckpt


@pytest.mark.parametrize("name, granularity", [
    ("resnet20", "block"), ("resnet20", "stage"), ("preact_resnet56", "block"), ("densenet121", "block"),
    ("vit_tiny", "block"),
])
def test_same_forward_gradients_and_bn_stats(name, granularity):
    kw = {"depth": 2} if name == "vit_tiny" else {}
    exact, ckpt = _pair(name, granularity, **kw)
    assert any(isinstance(m, Checkpointed) for m in ckpt.modules())
    assert list(ckpt.state_dict()) == list(exact.state_dict())  # the block itself, not a wrapper
    x = torch.randn(4, 3, 32, 32)
    out_e, out_c = exact(x), ckpt(x)
    assert torch.equal(out_e, out_c)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    for (n, pe), pc in zip(exact.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-5, atol=1e-6, msg=n)
    for (n, be), bc in zip(exact.named_buffers(), ckpt.buffers()):
        assert torch.equal(be, bc), f"buffer {n} differs after recomputation"
    exact.eval(), ckpt.eval()
    with torch.no_grad():
        assert torch.equal(exact(x), ckpt(x))


def test_stage_keeps_fewer_bytes_than_block():
    x = torch.randn(16, 3, 32, 32)
    exact, block = _pair("resnet20", "block")
    _, stage = _pair("resnet20", "stage")
    b_exact, b_block, b_stage = (activation_bytes(m, x) for m in (exact, block, stage))
    assert b_stage < b_block < b_exact


def test_refuses_model_without_blocks_and_unknown_granularity():
    with pytest.raises(StrategyError, match="found no block"):
        strategies.apply(nn.Sequential(nn.Flatten(), nn.Linear(3072, 10)), "checkpoint")
    with pytest.raises(ConfigError, match="strategy.granularity"):
        strategies.apply(models.build("resnet20", num_classes=10), "checkpoint", granularity="layer")
