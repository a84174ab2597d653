"""The contract of our models (actmem/models/base.py): fx-traceable, and every activation and pooling a
module of its own at each use site, ReLUs not in place -- so a strategy that swaps a module sees each use."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from actmem import models

OURS = [n for n in models.names() if models.info(n)["source"] == "actmem"]
ACTIVATION_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Softmax)
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
FUNCTIONAL = {F.relu, F.relu_, torch.relu, torch.relu_, F.gelu, F.silu, F.softmax, torch.softmax,
              F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
METHODS = {"relu", "relu_", "softmax", "sigmoid"}


def test_ours_are_the_cifar_models():
    assert OURS == sorted(n for n in models.names() if models.info(n)["input"] == "cifar")


@pytest.mark.parametrize("name", OURS)
def test_traceable_and_every_use_a_module(name):
    torch.manual_seed(0)
    kw = {"depth": 2} if name == "vit_tiny" else {}
    model = models.build(name, num_classes=10, **kw).eval()
    traced = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))

    nodes = list(traced.graph.nodes)
    assert not [n.target for n in nodes if n.op == "call_function" and n.target in FUNCTIONAL]
    assert not [n.target for n in nodes if n.op == "call_method" and n.target in METHODS]
    uses = [n.target for n in nodes if n.op == "call_module"]
    # (vit_tiny has no pooling: its head reads the class token)
    for kinds in (ACTIVATION_MODULES, POOL_MODULES):
        owned = [q for q, m in model.named_modules() if isinstance(m, kinds)]
        assert sorted(u for u in uses if u in owned) == sorted(owned), "each module called exactly once"
    assert any(isinstance(m, ACTIVATION_MODULES) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())


@pytest.mark.parametrize("name", OURS)
def test_swapping_a_module_changes_every_use(name):
    """Replace each activation by a recorder: the model calls every replacement, and only those."""
    kw = {"depth": 2} if name == "vit_tiny" else {}
    model = models.build(name, num_classes=10, **kw)
    seen = []

    class Recorder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            seen.append(self)
            return self.inner(x)

    swapped = []
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, ACTIVATION_MODULES):
                setattr(parent, child_name, Recorder(child))
                swapped.append(getattr(parent, child_name))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert len(seen) == len(swapped) > 0
    assert {id(m) for m in seen} == {id(m) for m in swapped}
