"""vit_tiny: the written-out attention is standard attention; depth/dim/heads are options."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from actmem import models
from actmem.core.errors import ConfigError
from actmem.models.vit import Attention, TransformerBlock


def test_attention_matches_scaled_dot_product():
    torch.manual_seed(0)
    attn = Attention(dim=24, heads=3)
    x = torch.randn(2, 5, 24)
    q, k, v = attn.qkv(x).view(2, 5, 3, 3, 8).permute(2, 0, 3, 1, 4)
    ref = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 24))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


def test_options_shape_the_model():
    model = models.build("vit_tiny", num_classes=7, depth=3, dim=48, heads=4, mlp_ratio=2)
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    assert len(blocks) == 3
    assert blocks[0].attn.heads == 4 and blocks[0].mlp.fc1.out_features == 96
    assert model.pos_embed.shape == (1, 65, 48)  # 64 patches of 4x4 and the class token
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ConfigError, match="dim=50 is not divisible by heads=4"):
        models.build("vit_tiny", num_classes=10, dim=50, heads=4)


def test_head_reads_the_class_token():
    """Without attention to carry information between tokens, the output could not depend on the image."""
    torch.manual_seed(0)
    model = models.build("vit_tiny", num_classes=10, depth=1).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        base = model(x)
        x2 = x.clone()
        x2[..., :4, :4] += 1  # one patch only
        assert not torch.allclose(model(x2), base)
        model.blocks[0].attn.proj.weight.zero_()
        model.blocks[0].attn.proj.bias.zero_()
        assert torch.allclose(model(x2), model(x))
