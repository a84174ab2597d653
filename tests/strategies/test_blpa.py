"""BLPA: exact forward, only the shared K-bit code and 1/std kept, exact parts of the backward exact,
close gradients on a real CIFAR-10 batch, clear refusals."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from actmem import data, models, strategies
from actmem.core.errors import ConfigError, StrategyError
from actmem.measure import activation_bytes, saved_bytes_by_module
from actmem.strategies import blpa
from actmem.strategies.blpa import BlpaBatchNorm2d, BlpaConv2d, BlpaReLU


def _pair(name: str, bits: int = 4, **kw):
    torch.manual_seed(0)
    exact = models.build(name, num_classes=10, **kw)
    return exact, strategies.apply(copy.deepcopy(exact), "blpa", bits=bits)


def _names(model, cls) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, cls)}


def _grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


@pytest.mark.parametrize("name, shape", [
    ("preact_resnet56", (4, 3, 32, 32)), ("resnet20", (4, 3, 32, 32)), ("resnet50", (2, 3, 64, 64)),
])
def test_forward_bit_identical_train_and_eval(name, shape):
    exact, model = _pair(name)
    x = torch.randn(*shape)
    assert torch.equal(exact(x), model(x))
    for (n, be), bb in zip(exact.named_buffers(), model.buffers()):
        assert torch.equal(be, bb), f"running statistic {n} differs"
    exact.eval(), model.eval()
    with torch.enable_grad():
        assert torch.equal(exact(x), model(x))
    with torch.no_grad():
        assert torch.equal(exact(x), model(x))


def test_chains_found_where_they_are():
    _, pre = _pair("preact_resnet56")
    bns = _names(pre, nn.BatchNorm2d)
    assert _names(pre, BlpaBatchNorm2d) == bns - {"bn"}  # the last BN -> ReLU -> pool -> fc stays exact
    assert _names(pre, BlpaConv2d) == _names(pre, nn.Conv2d) - {"conv1"}  # every conv but the first
    assert "layers.1.0.shortcut" in _names(pre, BlpaConv2d)  # the projection shares its block's code

    _, post = _pair("resnet20")
    assert _names(post, BlpaBatchNorm2d) == {"bn1"} | {f"layers.{s}.{b}.bn1" for s in range(3) for b in range(3)}

    _, tv = _pair("resnet50")  # torchvision: one in-place ReLU called three times per block
    blocks = _names(tv, models.block_types())
    assert len(blocks) == 16
    assert _names(tv, BlpaBatchNorm2d) == {f"{blk}.bn{i}" for blk in blocks for i in (1, 2)}
    relus = [m for m in tv.modules() if isinstance(m, BlpaReLU)]
    assert _names(tv, BlpaReLU) == {f"{blk}.relu" for blk in blocks}  # each block's one ReLU, the stem's not
    assert len(relus) == 16 and all(m.inplace for m in relus)  # `all` of none would pass: count them first
    assert tv.layer1[0].bn3.__class__ is nn.BatchNorm2d and tv.bn1.__class__ is nn.BatchNorm2d  # -> add / maxpool


@pytest.mark.parametrize("bits", [4, 8])
def test_keeps_only_the_code_and_std(bits):
    """Per chain: the BN keeps K bits per element + a uint8 shift and an fp32 1/std per channel; the
    ReLU and every conv fed by it keep nothing of their own (no full-precision activation)."""
    _, model = _pair("preact_resnet56", bits)
    x = torch.randn(8, 3, 32, 32)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].shape))
             for n, m in model.named_modules() if isinstance(m, BlpaBatchNorm2d)]
    saved = saved_bytes_by_module(model, x)
    for h in hooks:
        h.remove()
    assert inputs
    for name, shape in inputs.items():
        assert saved[name] == bits * -(-shape.numel() // 8) + shape[1] * (1 + 4), name
    for name in _names(model, BlpaConv2d) | _names(model, BlpaReLU):
        assert saved.get(name, 0) == 0, name


def _toy(gamma_sign: float = 1.0) -> nn.Sequential:
    """conv -> BN -> ReLU -> conv with gammas of both signs (|gamma| in [0.5, 1.5]) and small betas."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5).mul_(torch.tensor([1.0, -1.0] * 4) * gamma_sign)
        net[1].bias.uniform_(-0.5, 0.5)
    return net


def test_backward_is_exact_given_exact_u(monkeypatch):
    """With the code's decode replaced by the exact u, every gradient equals exact training's: the
    rebuilt conv input, the mask, and BN's backward (either sign of gamma) are right; only the
    quantization of u approximates."""
    exact = _toy()
    model = strategies.apply(copy.deepcopy(exact), "blpa", bits=8)
    x, r = torch.randn(16, 3, 12, 12), torch.randn(16, 16, 12, 12)
    z = copy.deepcopy(exact[:2])(x).detach()
    monkeypatch.setattr(blpa, "_decode_u", lambda p: z / exact[1].weight.detach().abs().view(1, -1, 1, 1))
    (exact(x) * r).sum().backward()
    (model(x) * r).sum().backward()
    for (n, pe), pb in zip(exact.named_parameters(), model.parameters()):
        torch.testing.assert_close(pb.grad, pe.grad, rtol=1e-4, atol=1e-4, msg=n)


def test_code_gives_exact_mask_and_bounded_error():
    model = strategies.apply(_toy(), "blpa", bits=4)
    x = torch.randn(16, 3, 12, 12)
    errors = {}
    for bits in (4, 8):
        model[1].bits = bits
        y = model[1](model[0](x))
        code = blpa._code_of(y)
        y_hat = blpa.rebuild_input(code.packed, code.gamma)
        assert torch.equal(y_hat > 0, y > 0)  # ReLU's mask, exactly
        gamma = model[1].weight.detach().abs().view(1, -1, 1, 1)
        inside = (y / gamma - model[1].bias.detach().view(1, -1, 1, 1) / gamma).abs() < 2.5  # no saturation
        step = 6 / 2**bits
        kept = inside & (y > 0)
        assert kept.any() and ((y_hat - y).abs() <= gamma * step / 2 * (1 + 1e-5))[kept].all()
        errors[bits] = (y_hat - y)[inside].norm() / y[inside].norm()
    assert errors[8] < errors[4] / 4


def test_gradients_close_and_deterministic():
    exact = _toy()
    x, r = torch.randn(16, 3, 12, 12), torch.randn(16, 16, 12, 12)
    (exact(x) * r).sum().backward()
    for bits, tol in ((4, 0.2), (8, 0.05)):
        runs = []
        for _ in range(2):
            model = strategies.apply(_toy(), "blpa", bits=bits)
            (model(x) * r).sum().backward()
            runs.append([p.grad for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*runs))  # no random rounding
        for got, want in ((runs[0][2], exact[1].weight.grad), (runs[0][4], exact[3].weight.grad)):
            assert (got - want).norm() < tol * want.norm(), bits
        # beta's gradient needs only the (exact) mask and the conv's (exact) input gradient
        torch.testing.assert_close(runs[0][3], exact[1].bias.grad, rtol=1e-5, atol=1e-5)


def test_real_cifar_batch_gradient_close(cifar10_root):
    batches = data.build({"name": "cifar10", "root": str(cifar10_root), "train_subset": 256}, batch_size=32,
                         device="cpu", seed=0)
    x, y = next(iter(batches.train))
    torch.manual_seed(0)
    exact = models.build("preact_resnet56", num_classes=10)
    coded = {bits: strategies.apply(copy.deepcopy(exact), "blpa", bits=bits) for bits in (4, 8)}
    F.cross_entropy(exact(x), y).backward()
    for bits, min_cos in ((4, 0.97), (8, 0.99)):  # measured 0.986 and 0.997
        F.cross_entropy(coded[bits](x), y).backward()
        assert F.cosine_similarity(_grad(exact), _grad(coded[bits]), 0) > min_cos


def test_bf16_autocast_forward_identical():
    exact, model = _pair("resnet20")
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_e, out_b = exact(x), model(x)
    assert out_b.dtype == torch.bfloat16 and torch.equal(out_e, out_b)
    out_e.float().square().sum().backward()
    out_b.float().square().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert F.cosine_similarity(_grad(exact), _grad(model), 0) > 0.9


def test_fewer_bytes_than_exact_on_torchvision_inplace_relu():
    exact, model = _pair("resnet50")
    x = torch.randn(2, 3, 64, 64)
    assert activation_bytes(model, x) < 0.8 * activation_bytes(exact, x)


def test_refusals():
    with pytest.raises(StrategyError, match="no BatchNorm2d -> ReLU -> Conv2d chain"):
        strategies.apply(models.build("vit_tiny", num_classes=10, depth=1), "blpa")
    with pytest.raises(ConfigError, match="4 or 8"):
        strategies.apply(models.build("resnet20", num_classes=10), "blpa", bits=2)

    zero = _toy()
    with torch.no_grad():
        zero[1].weight[3] = 0
    with pytest.raises(StrategyError, match=r"gamma == 0.*1 of 8 channels"):
        strategies.apply(zero, "blpa")
    model = strategies.apply(_toy(), "blpa")
    with torch.no_grad():
        model[1].weight[0] = 0  # reached zero after apply (e.g. a loaded checkpoint)
    with pytest.raises(StrategyError, match="gamma == 0"):
        model(torch.randn(2, 3, 8, 8))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _toy()

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    with pytest.raises(StrategyError, match="torch.fx"):
        strategies.apply(Branchy(), "blpa")

    # an earlier strategy's modules are left alone (as combo applies its parts, by the registry's function;
    # strategies.apply itself refuses a converted model): with every block checkpointed, no chain is left
    ckpt = strategies.apply(models.build("preact_resnet56", num_classes=10), "checkpoint")
    with pytest.raises(StrategyError, match="no BatchNorm2d"):
        strategies.STRATEGIES.get("blpa").fn(ckpt, strategies.resolve("blpa"))
