"""CIFAR ResNets: option-A shortcuts are parameter-free subsample-and-pad, option B a 1x1 projection."""
from __future__ import annotations

import pytest
import torch

from actmem import models
from actmem.core.errors import ConfigError
from actmem.models.resnet_cifar import BasicBlock, PadShortcut


def test_option_a_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(stride=2, extra_channels=16)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_resnet20_shortcut_options():
    pad = models.build("resnet20", num_classes=10)
    proj = models.build("resnet20", num_classes=10, shortcut="projection")
    assert sum(isinstance(m, PadShortcut) for m in pad.modules()) == 2
    assert not any(isinstance(m, PadShortcut) for m in proj.modules())
    n_pad, n_proj = (sum(p.numel() for p in m.parameters()) for m in (pad, proj))
    assert n_proj - n_pad == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)  # two 1x1 convs with their BNs
    with pytest.raises(ConfigError, match="shortcut='c'.*pad, projection"):
        models.build("resnet20", num_classes=10, shortcut="c")


@pytest.mark.parametrize("name", ["resnet18", "resnet20"])
def test_zero_init_residual(name):
    model = models.build(name, num_classes=10, zero_init_residual=True).eval()
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert blocks and all(not m.bn2.weight.any() for m in blocks)
    x = torch.randn(2, blocks[-1].conv2.out_channels, 4, 4)
    with torch.no_grad():
        assert torch.equal(blocks[-1](x), x.relu())
    default = models.build(name, num_classes=10)
    assert all(m.bn2.weight.all() for m in default.modules() if isinstance(m, BasicBlock))
