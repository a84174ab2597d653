"""Nested forward-AD: same forward bit for bit, exact gradients, only σ's input kept; the pairs it
fuses in our models; composite activations; the fused Triton kernel (interpreted on CPU)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from helpers import REPO

from actmem import models, strategies
from actmem.core.errors import StrategyError
from actmem.measure import saved_bytes_by_module
from actmem.models.primitives import GeluTanh, MishPrim, Swish
from actmem.strategies.forward_ad import Deferred, NestedConv2d, NestedLinear, find_pairs


def _pair(name, **kw):
    torch.manual_seed(0)
    exact = models.build(name, num_classes=10, **kw)
    return exact, strategies.apply(copy.deepcopy(exact), "forward_ad")


def _grads_match(exact, fused, tol=1e-5):
    """Equal to float tolerance, relative to the largest gradient (some are zero in exact arithmetic:
    e.g. a BatchNorm bias followed by a 1x1 conv and another BatchNorm in training mode)."""
    scale = max(p.grad.abs().max() for p in exact.parameters())
    for (n, pe), pf in zip(exact.named_parameters(), fused.parameters()):
        assert pf.grad.dtype == pe.grad.dtype
        torch.testing.assert_close(pf.grad / scale, pe.grad / scale, rtol=tol, atol=tol / 10, msg=n)


VIT_PAIRS = [("blocks.0.mlp.act", "blocks.0.mlp.fc2"), ("blocks.1.mlp.act", "blocks.1.mlp.fc2")]


@pytest.mark.parametrize("name, kw, size, expected", [
    ("vit_tiny", {"depth": 2}, 32, VIT_PAIRS),
    ("convnext_tiny", {}, 32, 18),  # every CNBlock: Linear -> GELU -> Linear
    ("efficientnet_b0", {}, 64, 32),  # stem SiLU -> dw conv, expansion SiLU -> dw conv, SE SiLU -> fc2
])
def test_same_forward_exact_gradients(name, kw, size, expected):
    exact, fused = _pair(name, **kw)
    pairs = find_pairs(exact)
    assert pairs == expected if isinstance(expected, list) else len(pairs) == expected
    assert sum(isinstance(m, Deferred) for m in fused.modules()) == len(pairs)
    assert list(exact.state_dict()) == list(fused.state_dict())
    x = torch.randn(2, 3, size, size)
    torch.manual_seed(1)
    out_e = exact(x)
    torch.manual_seed(1)
    out_f = fused(x)  # same stochastic-depth / dropout draws
    assert torch.equal(out_e, out_f)
    out_e.square().sum().backward()
    out_f.square().sum().backward()
    _grads_match(exact, fused)
    exact.eval(), fused.eval()
    with torch.no_grad():
        assert torch.equal(exact(x), fused(x))


def test_vit_keeps_only_the_activation_input():
    exact, fused = _pair("vit_tiny")
    x = torch.randn(4, 3, 32, 32)
    by_e, by_f = saved_bytes_by_module(exact, x), saved_bytes_by_module(fused, x)
    hidden = 4 * 65 * 768 * 4  # GELU input / fc2 input: batch x tokens x hidden, fp32
    for i in range(12):
        mlp = f"blocks.{i}.mlp"
        assert by_e[f"{mlp}.act"] == hidden and by_e[f"{mlp}.fc2"] == hidden
        assert by_f[f"{mlp}.fc2"] == hidden and f"{mlp}.act" not in by_f
    assert sum(by_e.values()) - sum(by_f.values()) == 12 * hidden
    assert sum(by_e.values()) / sum(by_f.values()) >= 1.3


@pytest.mark.parametrize("act, kept_by_exact", [
    (nn.GELU(), 2), (nn.SiLU(), 2), (GeluTanh(), 5), (MishPrim(), 3), (Swish(), 3),
])
def test_composite_activations(act, kept_by_exact):
    """Tensors of the hidden size that autograd keeps for σ and f2 (σ's input, intermediates, σ's output)
    vs forward_ad: σ's input alone."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 64), act, nn.Linear(64, 16))
    fused = strategies.apply(copy.deepcopy(block), "forward_ad", elementwise=[type(act).__name__])
    assert isinstance(fused[1], Deferred) and isinstance(fused[2], NestedLinear)
    x = torch.randn(32, 16, requires_grad=True)
    hidden = 32 * 64 * 4
    by_e, by_f = saved_bytes_by_module(block, x), saved_bytes_by_module(fused, x)
    assert by_e["1"] + by_e["2"] == kept_by_exact * hidden, by_e
    assert by_f == {"0": by_e["0"], "2": hidden}
    block(x).square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    fused(x).square().sum().backward()
    _grads_match(block, fused)
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-6)


def test_conv_pair_and_autocast():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(inplace=True),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False), nn.Flatten(), nn.Linear(128, 4))
    fused = strategies.apply(copy.deepcopy(net), "forward_ad")
    assert isinstance(fused[3], NestedConv2d)
    x = torch.randn(4, 3, 8, 8)
    for autocast in (False, True):
        for m in (net, fused):
            m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out_e, out_f = net(x), fused(x)
        assert torch.equal(out_e, out_f)
        out_e.float().square().sum().backward()
        out_f.float().square().sum().backward()
        _grads_match(net, fused, tol=0.05 if autocast else 1e-5)  # bf16: σ' rounded differently


def test_refusals():
    with pytest.raises(StrategyError, match="ReLU"):
        strategies.apply(models.build("resnet20", num_classes=10), "forward_ad")

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.act, self.fc = nn.GELU(), nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.act(x)) if x.sum() > 0 else x

    with pytest.raises(StrategyError, match="tracing"):
        strategies.apply(Untraceable(), "forward_ad")
    # σ used twice (its output feeds f2 and a residual): not fused
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.act, self.fc = nn.GELU(), nn.Linear(4, 4)

        def forward(self, x):
            y = self.act(x)
            return self.fc(y) + y

    assert find_pairs(Residual()) == []


TRITON_CHECK = """
import torch, torch.nn as nn
from actmem.compress import triton_activation
from actmem.strategies.forward_ad import kernel_kind, NestedLinear
x = torch.cat([torch.randn(3000) * 4, torch.tensor([0.0, 19.9, 20.1, -30.0, 30.0])])
for act in (nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Mish()):
    for dtype, tol in ((torch.float32, 3e-6), (torch.bfloat16, 2e-2)):
        y, d = triton_activation.value_and_derivative(x.to(dtype), kernel_kind(act))
        y0, d0 = torch.func.jvp(act, (x.double(),), (torch.ones_like(x, dtype=torch.float64),))
        assert y.dtype == d.dtype == dtype
        torch.testing.assert_close(y.double(), y0, rtol=tol, atol=tol)
        torch.testing.assert_close(d.double(), d0, rtol=tol, atol=tol)
# the fused layer's backward through the kernel vs. plain autograd
torch.manual_seed(0)
block = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
x = torch.randn(16, 8)
block(x).square().sum().backward()
expected = [p.grad.clone() for p in block.parameters()]
from actmem import strategies
fused = strategies.apply(block, "forward_ad")
fused.zero_grad()
fused(x).square().sum().backward()
for p, g in zip(fused.parameters(), expected):
    torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_fused_triton_kernel_matches_forward_mode_jvp():
    env = {**os.environ, "TRITON_INTERPRET": "1", "ACTMEM_BACKEND": "triton"}  # set before Triton defines kernels
    res = subprocess.run([sys.executable, "-c", TRITON_CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]

