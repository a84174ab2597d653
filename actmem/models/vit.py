"""A small Vision Transformer for 32x32 images: 4x4 patches (64 tokens) plus a class token, learned
position embeddings, pre-norm blocks, GELU MLPs; the head reads the class token.

Attention is written out (Linear qkv, MatMul, nn.Softmax, MatMul, Linear) rather than fused, so a
strategy sees and can swap each piece, and what autograd keeps of each is visible.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from actmem.core.errors import ConfigError
from actmem.models.base import MODELS, MatMul

IMAGE_SIZE, PATCH_SIZE = 32, 4


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.scores = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.mix = MatMul()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x: [B, N, dim]
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, head_dim]
        attn = self.softmax(self.scores(q * self.scale, k.transpose(-2, -1)))
        return self.proj(self.mix(attn, v).transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, num_classes: int, dim: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, PATCH_SIZE, PATCH_SIZE)
        self.flatten = nn.Flatten(2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (IMAGE_SIZE // PATCH_SIZE) ** 2, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self):
        """Truncated normal (std 0.02) for every weight matrix and the embeddings, zero biases, LN at 1/0."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.flatten(self.patch_embed(x)).transpose(1, 2)  # [B, 64, dim]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@MODELS.register("vit_tiny", input="cifar", activation="gelu", family="vit", blocks=(TransformerBlock,))
def vit_tiny(num_classes: int, depth: int = 12, dim: int = 192, heads: int = 3,
             mlp_ratio: float = 4.0) -> ViT:
    """5.36M parameters at the defaults (ViT-Ti widths, patch 4 for 32x32, class-token head)."""
    if dim % heads:
        raise ConfigError(f"vit_tiny: dim={dim} is not divisible by heads={heads}; "
                          "pick dim = heads x head size, e.g. dim=192 heads=3.")
    return ViT(num_classes, dim, depth, heads, mlp_ratio)
