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


# The last convolution of each residual block type's branch: what zero_init_residual zeroes.
LAST_CONV = {PreActBlock: "conv2", PreActBottleneck: "conv3"}


def _residual_blocks(model: nn.Module) -> list[nn.Module]:
    """Every residual block of `model`, of whatever type: the modules the model's zero_init_residual reaches
    (they have zero_init_last_). Fails on a type LAST_CONV does not know, so none goes unchecked."""
    blocks = [m for m in model.modules() if hasattr(m, "zero_init_last_")]
    unknown = {type(m).__name__ for m in blocks} - {t.__name__ for t in LAST_CONV}
    assert not unknown, f"residual block types without a LAST_CONV entry: {sorted(unknown)}"
    return blocks


@pytest.mark.parametrize("name, types", [
    ("preact_resnet56", {PreActBlock}), ("preact_resnet164", {PreActBottleneck}), ("wrn28_10", {PreActBlock}),
])
def test_zero_init_residual_makes_identity_blocks_identities(name, types):
    model = models.build(name, num_classes=10, zero_init_residual=True).eval()
    blocks = _residual_blocks(model)
    assert {type(m) for m in blocks} == types == set(models.info(name)["blocks"])
    identity = [m for m in blocks if m.shortcut is None]
    assert identity and all(not torch.any(getattr(m, LAST_CONV[type(m)]).weight) for m in blocks)
    x = torch.randn(2, identity[-1].bn1.num_features, 8, 8)
    with torch.no_grad():
        assert torch.equal(identity[-1](x), x)

    default = _residual_blocks(models.build(name, num_classes=10))
    assert len(default) == len(blocks) > 0  # the default init below is checked on every block
    for m in default:
        assert getattr(m, LAST_CONV[type(m)]).weight.abs().sum() > 0, f"{type(m).__name__} zeroed by default"


def test_wrn_dropout_sits_between_relu2_and_conv2():
    assert not any(isinstance(m, nn.Dropout) for m in models.build("wrn28_10", num_classes=10).modules())
    block = PreActBlock(16, 16, dropout=0.3)
    graph = fx.symbolic_trace(block).graph
    by_target = {n.target: n for n in graph.nodes if n.op == "call_module"}
    assert by_target["dropout"].args == (by_target["relu2"],)
    assert by_target["conv2"].args == (by_target["dropout"],)
    assert block.dropout.p == 0.3
