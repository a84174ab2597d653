"""combo: parts applied in order, later parts leave earlier parts' layers alone, impossible pairs refused
before anything is applied; the command line takes a list of names or of configs."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from helpers import run_train

from actmem import models, strategies
from actmem.core.errors import ConfigError, StrategyError
from actmem.measure import activation_bytes
from actmem.strategies.base import Claimed
from actmem.strategies.fewbit import FewBit
from actmem.strategies.forward_ad import Deferred, NestedConv2d


def _vit():
    torch.manual_seed(0)
    return models.build("vit_tiny", num_classes=10, depth=2)


def test_fewbit_then_actnn_on_vit():
    exact = _vit()
    combo = strategies.apply(copy.deepcopy(exact), "combo", parts=[{"name": "fewbit", "bits": 2}, "actnn"])
    mlp = combo.blocks[0].mlp
    assert isinstance(mlp.act, FewBit) and mlp.act.bits == 2 and isinstance(mlp.act, nn.GELU)
    linears = [m for m in combo.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, Claimed) and type(m) is not nn.Linear for m in linears)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(exact(x), combo(x))
    combo(x).sum().backward()
    b_exact, b_combo = activation_bytes(exact, x), activation_bytes(combo, x)
    b_fewbit = activation_bytes(strategies.apply(copy.deepcopy(exact), "fewbit", bits=2), x)
    b_actnn = activation_bytes(strategies.apply(copy.deepcopy(exact), "actnn"), x)
    assert b_combo < min(b_fewbit, b_actnn) < b_exact


def test_forward_ad_then_fewbit_share_the_activations():
    """forward_ad fuses each SiLU that feeds one conv; fewbit takes every other activation."""
    torch.manual_seed(0)
    exact = models.build("efficientnet_b0", num_classes=10, dropout=0.0, stochastic_depth_prob=0.0)
    combo = strategies.apply(copy.deepcopy(exact), "combo", parts=["forward_ad", "fewbit"])
    fused = [m for m in combo.modules() if isinstance(m, NestedConv2d)]
    few = [m for m in combo.modules() if isinstance(m, FewBit)]
    acts = [m for m in exact.modules() if isinstance(m, (nn.SiLU, nn.Sigmoid))]
    assert len(fused) == sum(isinstance(m, Deferred) for m in combo.modules()) == 32
    assert len(fused) + len(few) == len(acts)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(exact(x), combo(x))


@pytest.mark.parametrize("parts, match", [
    (["checkpoint", "fewbit"], "checkpoint cannot be combined"),
    (["actnn", "division"], "pick one"),
    (["fewbit", "forward_ad"], "Put forward_ad first"),
    (["actnn", "forward_ad"], "Put forward_ad first"),
    (["fewbit", "fewbit"], "twice"),
    (["combo"], "cannot be combo"),
])
def test_refused_before_anything_is_applied(parts, match):
    model = _vit()
    before = copy.deepcopy(model)
    with pytest.raises(StrategyError, match=match):
        strategies.apply(model, "combo", parts=parts)
    assert str(model) == str(before)  # untouched


def test_bad_parts():
    with pytest.raises(ConfigError, match="strategy.parts"):
        strategies.apply(_vit(), "combo", parts=[])
    with pytest.raises(ConfigError, match="Valid strategy names"):
        strategies.apply(_vit(), "combo", parts=["fewbits"])
    with pytest.raises(StrategyError, match=r"combo part 2 \(fewbit\)"):  # forward_ad took every GELU
        strategies.apply(_vit(), "combo", parts=["forward_ad", "fewbit"])


def test_command_line(tmp_path):
    res = run_train("dataset=synthetic", "model=vit_tiny", "+model.kwargs.depth=2", "trainer.batch_size=16",
                    "strategy=combo", "strategy.parts=[{name:fewbit,bits:2},actnn]", "trainer.max_steps=2",
                    "logger=none", run_dir=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["activation_ratio"] > 2
    assert summary["strategy_config"]["parts"][0] == {"name": "fewbit", "bits": 2}


@pytest.mark.parametrize("first, second, suggested", [
    ("fewbit", "actnn", "strategy.parts=[fewbit,actnn]"),
    ("actnn", "forward_ad", "strategy.parts=[forward_ad,actnn]"),  # the order combo takes
    ("actnn", "division", None),  # combo refuses the pair in either order: no suggestion of it
    ("checkpoint", "fewbit", None),
])
def test_a_second_strategy_suggests_only_a_combo_that_combo_takes(first, second, suggested):
    model = strategies.apply(_vit(), first)
    with pytest.raises(StrategyError) as refused:
        strategies.apply(model, second)
    said = str(refused.value)
    if suggested:
        assert suggested in said
        parts = suggested.split("[")[1].rstrip("]").split(",")
        strategies.resolve({"name": "combo", "parts": parts})  # and combo takes it
    else:
        assert "strategy=combo" not in said and "cannot be combined" in said
