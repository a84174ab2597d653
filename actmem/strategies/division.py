"""DIVISION (Wang et al., arXiv 2208.04187; official code guanchuwang/division, `fdmp/module.py`).

Every Conv and BatchNorm input is kept as its low-frequency part (B x B block means, bf16) plus its
high-frequency residual at Q bits per (sample, channel) (`compress.split_quantize`); ReLU and Dropout
keep a 1-bit mask, MaxPool2d the argmax inside its window; average pooling stays average pooling and
GELU/SiLU/LayerNorm/softmax stay exact. The forward pass is exact; see `layers.py`.

Where this differs from the official code:
- Linear inputs are compressed too (`compress_linear=True`); the official code leaves every Linear,
  so also the classifier, uncompressed -- `compress_linear=False` reproduces that. A Linear input
  [..., F] has no spatial axes: each row is split along F (means of B consecutive features in bf16,
  the residual at Q bits with one min/step per row), the form `split_quantize` gives 2-D input.
- BatchNorm1d/3d get their own layers (the official code swaps BatchNorm1d for its 2-d layer).
- Conv3d/BatchNorm3d inputs [N, C, D, H, W] are split per depth slice ([N, C*D, H, W]); the official
  code has no 3-d split.
- An input whose planes are single pixels ([N, C, 1, 1], e.g. squeeze-excitation convs) would only
  grow under the split (bf16 mean + min/step per element); it is kept uncompressed instead. The official
  code keeps every 4-D input with H == 1 exact; here [N, C, 1, W] with W > 1 is split along W like a row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from actmem.compress.packed import Packed
from actmem.compress.split import split_geometry, split_quantize
from actmem.core.errors import ConfigError, StrategyError
from actmem.strategies.base import STRATEGIES
from actmem.strategies.layers import TRANSFORMER, Codec, swap_layers
from actmem.strategies.ops import keep


@dataclass
class DivisionConfig:
    name: str = "division"
    block: int = 8  # B: side of the low-frequency blocks (global pooling where a map is smaller)
    bits: int = 2  # Q: bits per element of the high-frequency residual
    compress_linear: bool = True  # False: Linear layers stay exact, as in the official code


class SplitCodec(Codec):
    """DIVISION's split of a feature map; `rows=True` for Linear inputs (each row split along F)."""

    def __init__(self, block: int, bits: int, rows: bool = False):
        self.block, self.bits, self.rows = block, bits, rows

    def pack(self, x: torch.Tensor) -> Packed:
        if self.rows:
            x = x.reshape(-1, x.shape[-1])
        elif x.dim() == 5:
            x = x.flatten(1, 2)
        _, height, width, _, _ = split_geometry(x.shape, self.block)
        if height * width == 1:
            return keep(x)
        return split_quantize(x, self.block, self.bits)


def check_division(cfg) -> None:
    if not 1 <= cfg.bits <= 8:
        raise ConfigError(f"strategy.bits={cfg.bits}: DIVISION's high-frequency part takes 1..8 bits (paper: 2).")
    if cfg.block < 1:
        raise ConfigError(f"strategy.block={cfg.block}: use a positive block size (paper: 8).")


@STRATEGIES.register("division", schema=DivisionConfig, check=check_division)
def apply_division(model: nn.Module, cfg) -> nn.Module:
    maps, rows = SplitCodec(cfg.block, cfg.bits), SplitCodec(cfg.block, cfg.bits, rows=True)

    def codec_for(name, module):
        if type(module) in TRANSFORMER:
            return None  # the split is spatial (feature maps); tokens stay as exact training keeps them
        if isinstance(module, nn.Linear):
            return rows if cfg.compress_linear else None
        return maps  # Conv and BatchNorm

    if not swap_layers(model, codec_for):
        raise StrategyError(f"division found nothing to compress in {type(model).__name__}: it needs "
                            "nn.Conv*/BatchNorm*/Linear/ReLU/Dropout/MaxPool2d modules (not functional "
                            "calls or subclasses). Use strategy=checkpoint for such a model.")
    return model
