"""airbench94: the published layer list and size, the whitening init, and every strategy on it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from actmem import models, strategies
from actmem.core.errors import ConfigError, StrategyError
from actmem.models.airbench import ConvGroup, init_whitening_

# The published layer list (airbench94.py's make_net), weights + biases:
#   whitening conv 3 -> 24, 2x2, bias:   24*3*2*2 + 24            =       312
#   block 1 (24 -> 64):   convs 24*64*9 + 64*64*9, 2 BNs 2*2*64    =    50,944
#   block 2 (64 -> 256):  convs 64*256*9 + 256*256*9, BNs 2*2*256  =   738,304
#   block 3 (256 -> 256): convs 2 * 256*256*9, BNs 2*2*256         = 1,180,672
#   head Linear(256, 10, bias=False)                               =     2,560
# total 1,972,792 (the paper's 1.97M); frozen: the whitening weight (288) and the six BN weights
# (2*64 + 4*256 = 1,152), so 1,971,352 train.
PARAMS = 1_972_792
TRAINABLE = PARAMS - 288 - 1_152
# Strategies whose backward is exact up to float rounding (the others compress what backward reads).
EXACT_GRADIENTS = {"exact", "checkpoint", "forward_ad"}


def _build(**kw) -> nn.Module:
    torch.manual_seed(0)
    return models.build("airbench94", num_classes=10, **kw)


def _batch(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _correlated_images(n: int = 8) -> torch.Tensor:
    """Smooth images with mixed channels: their 2x2 patches are far from white."""
    g = torch.Generator().manual_seed(2)
    low = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.5, 0.4], [0.0, 0.0, 0.3]])
    return torch.einsum("dc,nchw->ndhw", mix, low) + 0.2 * torch.randn(n, 3, 32, 32, generator=g) + 0.3


def test_shape_size_and_frozen_parameters():
    model = _build()
    with torch.no_grad():
        assert model.eval()(_batch(2)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == PARAMS
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == TRAINABLE
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6 and all(not m.weight.requires_grad and m.bias.requires_grad for m in bns)
    assert all(m.momentum == 0.4 and m.eps == 1e-12 for m in bns)  # the script's momentum 0.6 is 1 - 0.4
    assert [g.conv2.out_channels for g in model.layers] == [64, 256, 256]
    assert model.fc.bias is None and model.scaling_factor == 1 / 9
    assert models.info("airbench94")["kwargs"] == {"batchnorm_weight_trainable": False}
    trained = _build(batchnorm_weight_trainable=True)
    assert sum(p.numel() for p in trained.parameters() if p.requires_grad) == TRAINABLE + 1_152


def test_published_init_identity_convs_and_determinism():
    model = _build()
    x = torch.randn(1, 256, 5, 5)
    with torch.no_grad():
        assert torch.equal(model.layers[2].conv1(x), x)  # 256 -> 256: all filters dirac
        assert torch.equal(model.layers[0].conv1(x[:, :24])[:, :24], x[:, :24])  # the first c_in filters
    assert not model.whiten.bias.any()
    again = _build()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_fx_trace_matches_and_every_activation_and_pool_is_its_own_module():
    model = _build().eval()
    traced = fx.symbolic_trace(model)
    x = _batch(2)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
    called = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    owned = [q for q, m in model.named_modules() if isinstance(m, (nn.GELU, nn.MaxPool2d))]
    assert len(owned) == 7 + 4 and sorted(q for q in called if q in owned) == sorted(owned)
    assert any(isinstance(m, models.block_types()) for m in model.modules())
    assert sum(isinstance(m, ConvGroup) for m in model.modules()) == 3


def test_whitening_init_whitens_the_patches_and_freezes_the_conv():
    model, images = _build(), _correlated_images()
    init_whitening_(model.whiten, images)
    w = model.whiten.weight
    assert w.shape == (24, 3, 2, 2) and not w.requires_grad and model.whiten.bias.requires_grad
    assert torch.equal(w[12:], -w[:12])  # both signs of the 12 eigenvector filters

    # The first 12 outputs over every patch of the batch: second moment diag(λ / (λ + eps)) ~ identity.
    with torch.no_grad():
        out = model.whiten(images)[:, :12].double()  # bias is zero
    rows = out.permute(0, 2, 3, 1).reshape(-1, 12)
    moment = rows.T @ rows / len(rows)
    patches = F.unfold(images.double(), 2).transpose(1, 2).reshape(-1, 12)
    lam = torch.linalg.eigvalsh(patches.T @ patches / len(patches)).flip(0)  # largest first, as the filters
    torch.testing.assert_close(moment, torch.diag(lam / (lam + 5e-4)), atol=1e-5, rtol=1e-5)
    assert lam.max() / lam.min() > 100  # the patches were far from white; eps is small beside every λ:
    torch.testing.assert_close(moment, torch.eye(12, dtype=torch.float64), atol=0.02, rtol=0)

    init_whitening_(model.whiten, images, eps=0.0)
    with torch.no_grad():
        rows = model.whiten(images)[:, :12].double().permute(0, 2, 3, 1).reshape(-1, 12)
    torch.testing.assert_close(rows.T @ rows / len(rows), torch.eye(12, dtype=torch.float64), atol=1e-4, rtol=0)


def test_whitening_init_refuses_a_conv_it_cannot_fill():
    with pytest.raises(ConfigError, match="24 output channels"):
        init_whitening_(nn.Conv2d(3, 12, 2), _correlated_images(2))
    with pytest.raises(ConfigError, match=r"\[N, 3, H, W\]"):
        init_whitening_(nn.Conv2d(3, 24, 2), torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("name", strategies.STRATEGIES.names())
def test_every_strategy_keeps_the_forward_exact(name):
    exact = _build()
    init_whitening_(exact.whiten, _correlated_images(4))
    if name == "blpa":  # it serves BatchNorm -> ReLU -> Conv chains only; airbench has GELUs
        with pytest.raises(StrategyError, match="no BatchNorm2d -> ReLU -> Conv2d chain"):
            strategies.apply(copy.deepcopy(exact), name)
        return
    model = strategies.apply(copy.deepcopy(exact), name)
    x = _batch()
    out_e, out_s = exact(x), model(x)  # train mode: batch statistics, running stats updated
    assert torch.equal(out_e, out_s)
    out_e.square().sum().backward()
    out_s.square().sum().backward()
    state = model.state_dict()
    for n, be in exact.named_buffers():
        assert torch.equal(be, state[n]), f"buffer {n}"
    for (n, pe), ps in zip(exact.named_parameters(), model.parameters()):
        assert (ps.grad is None) == (not pe.requires_grad), n
        if pe.requires_grad:
            assert torch.isfinite(ps.grad).all(), n
            if name in EXACT_GRADIENTS:
                torch.testing.assert_close(ps.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=n)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval(), exact.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
