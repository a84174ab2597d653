"""Pre-activation blocks: BN -> ReLU -> Conv in attribute order and in the traced graph, projections on
the pre-activated tensor, zero-init of the residual branch, WRN dropout only when asked for."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from actmem import models
from actmem.models.preact_resnet import PreActBlock, PreActBottleneck

CHAINS = {PreActBlock: ["1", "2"], PreActBottleneck: ["1", "2", "3"]}


@pytest.mark.parametrize("name, block, n_blocks", [
    ("preact_resnet56", PreActBlock, 27), ("preact_resnet164", PreActBottleneck, 54),
])
def test_bn_relu_conv_chains_in_the_traced_graph(name, block, n_blocks):
    model = models.build(name, num_classes=10)
    blocks = {q: m for q, m in model.named_modules() if isinstance(m, block)}
    assert len(blocks) == n_blocks
    order = [n for n, _ in block(16, 16).named_children() if n != "shortcut"]
    assert order == [f"{kind}{i}" for i in CHAINS[block] for kind in ("bn", "relu", "conv")]

    graph = fx.symbolic_trace(model).graph
    by_target = {n.target: n for n in graph.nodes if n.op == "call_module"}
    for q, m in blocks.items():
        for i in CHAINS[block]:
            bn, relu, conv = (by_target[f"{q}.{kind}{i}"] for kind in ("bn", "relu", "conv"))
            assert relu.args == (bn,) and conv.args == (relu,), f"{q}: bn{i} -> relu{i} -> conv{i} broken"
        if m.shortcut is not None:  # the projection reads the pre-activated input, as He et al.
            assert by_target[f"{q}.shortcut"].args == (by_target[f"{q}.relu1"],)


@pytest.mark.parametrize("name", ["preact_resnet56", "preact_resnet164", "wrn28_10"])
def test_zero_init_residual_makes_identity_blocks_identities(name):
    model = models.build(name, num_classes=10, zero_init_residual=True).eval()
    blocks = [m for m in model.modules() if isinstance(m, (PreActBlock, PreActBottleneck))]
    identity = [m for m in blocks if m.shortcut is None]
    assert identity and all(not torch.any(m.conv2.weight if isinstance(m, PreActBlock) else m.conv3.weight)
                            for m in blocks)
    x = torch.randn(2, identity[-1].bn1.num_features, 8, 8)
    with torch.no_grad():
        assert torch.equal(identity[-1](x), x)
    default = models.build(name, num_classes=10)
    assert all(m.conv2.weight.abs().sum() > 0 for m in default.modules() if isinstance(m, PreActBlock))


def test_wrn_dropout_sits_between_relu2_and_conv2():
    assert not any(isinstance(m, nn.Dropout) for m in models.build("wrn28_10", num_classes=10).modules())
    block = PreActBlock(16, 16, dropout=0.3)
    graph = fx.symbolic_trace(block).graph
    by_target = {n.target: n for n in graph.nodes if n.op == "call_module"}
    assert by_target["dropout"].args == (by_target["relu2"],)
    assert by_target["conv2"].args == (by_target["dropout"],)
    assert block.dropout.p == 0.3
