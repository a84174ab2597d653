"""Learning-rate schedules: warm-up, cosine, multistep, one-cycle."""
import pytest
import torch
from omegaconf import OmegaConf

from actmem.core.config import OptimConfig
from actmem.core.errors import ConfigError
from actmem.runtime.optim import build_optimizer, lr_factor, set_trainable


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


def test_onecycle_is_airbench94s_triangle():
    """The script's triangle(476, start=0.2, end=0.07, peak=0.23): 1 at step int(0.23 * 476) = 109."""
    c = cfg(schedule="onecycle", cycle_start=0.2, cycle_peak=0.23, cycle_end=0.07)
    f = [lr_factor(s, 476, 48, c) for s in range(477)]
    assert f[0] == pytest.approx(0.2) and f[109] == pytest.approx(1.0) and f[476] == pytest.approx(0.07)
    assert f[50] == pytest.approx(0.2 + 0.8 * 50 / 109) and f[300] == pytest.approx(1 - 0.93 * 191 / 367)
    assert max(f) == f[109]


def net():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 2), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    model[1].weight.requires_grad_(False)  # frozen at build: left out of the optimizer
    return model


def test_groups_scale_lr_and_weight_decay_by_name():
    c = cfg(lr=1.5, weight_decay=0.01, groups=[{"params": ["1.bias"], "lr_scale": 64, "weight_decay_scale": 1 / 64}])
    model = net()
    opt = build_optimizer(model, c)
    plain, bn = opt.param_groups
    assert plain["params"] == [model[0].weight, model[0].bias] and plain["lr"] == 1.5
    assert plain["weight_decay"] == 0.01
    assert bn["params"] == [model[1].bias] and bn["lr"] == 96 and bn["weight_decay"] == pytest.approx(0.01 / 64)
    assert all(p is not model[1].weight for g in opt.param_groups for p in g["params"])


def test_a_group_matching_nothing_is_refused_with_the_names():
    with pytest.raises(ConfigError, match=r"optim.groups\[0\].params=\['bn.bias'\].*0.weight") as refused:
        build_optimizer(net(), cfg(groups=[{"params": ["bn.bias"]}]))
    # the groups may be a preset's, written for its own model: the fix says how to drop them
    assert "preset" in str(refused.value) and "optim.groups=[]" in str(refused.value)


def test_train_epochs_freezes_a_group_from_that_epoch():
    c = cfg(groups=[{"params": ["0.bias"], "train_epochs": 3}])
    model = net()
    opt = build_optimizer(model, c)
    before = model[0].bias.detach().clone()
    for epoch in range(5):
        set_trainable(model, c, epoch)
        assert model[0].bias.requires_grad == (epoch < 3) and model[0].weight.requires_grad
        opt.zero_grad(set_to_none=True)
        model(torch.randn(4, 3, 5, 5)).square().mean().backward()
        opt.step()
        if epoch == 2:
            before = model[0].bias.detach().clone()
    assert torch.equal(model[0].bias, before)  # untouched by epochs 3 and 4: no decay, no momentum
