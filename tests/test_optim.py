"""Learning-rate schedules: warm-up, cosine, multistep, one-cycle."""
import pytest
import torch
from omegaconf import OmegaConf

from actmem.config import OptimConfig
from actmem.optim import build_optimizer, lr_factor


def cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(OptimConfig), kw)


def test_warmup_then_cosine_to_zero():
    c = cfg(schedule="cosine", warmup_epochs=1, warmup_start=0.1)
    f = [lr_factor(s, 100, 10, c) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[5] == pytest.approx(0.55) and f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5) and f[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_multistep_and_onecycle():
    m = cfg(schedule="multistep", milestones=[2, 4], gamma=0.1)
    assert [lr_factor(s, 60, 10, m) for s in (0, 19, 20, 40)] == pytest.approx([1, 1, 0.1, 0.01])
    o = cfg(schedule="onecycle")
    assert lr_factor(30, 100, 10, o) == pytest.approx(1.0) and lr_factor(100, 100, 10, o) == pytest.approx(0.0)


def test_adamw_decays_weights_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = build_optimizer(model, cfg(name="adamw", weight_decay=0.05))
    decay, no_decay = opt.param_groups
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == 0.05
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
