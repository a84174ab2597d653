"""ImageNet models: torchvision's, with weights=None (fresh init), as they are.

They are not written for module swapping the way ours are, and `info()` says so:
- resnet50, wide_resnet50_2: each Bottleneck calls one `self.relu` three times; ReLUs are in-place.
- densenet161: in-place ReLUs, and the final ReLU and pooling are functional (F.relu, adaptive pool).
- efficientnet_b0: in-place SiLUs; stochastic depth 0.2 and dropout 0.2 by default (torchvision's).
- convnext_tiny: GELU modules, its own LayerNorm2d/Permute layers; stochastic depth 0.1 by default.
"""
from __future__ import annotations

import torch.nn as nn
from torchvision import models as tvm

from actmem.models.base import MODELS

_RESNET = dict(input="imagenet", activation="relu", family="resnet", source="torchvision",
               reuses_activation=True, inplace_activation=True, blocks=(tvm.resnet.BasicBlock, tvm.resnet.Bottleneck))


@MODELS.register("resnet50", **_RESNET)
def resnet50(num_classes: int, zero_init_residual: bool = False) -> nn.Module:
    """25.56M parameters at 1000 classes."""
    return tvm.resnet50(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)


@MODELS.register("wide_resnet50_2", **_RESNET)
def wide_resnet50_2(num_classes: int, zero_init_residual: bool = False) -> nn.Module:
    """68.88M parameters at 1000 classes."""
    return tvm.wide_resnet50_2(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)


@MODELS.register("densenet161", input="imagenet", activation="relu", family="densenet",
                 source="torchvision", reuses_activation=False, inplace_activation=True,
                 functional_activation=True, blocks=(tvm.densenet._DenseLayer,))
def densenet161(num_classes: int, drop_rate: float = 0.0) -> nn.Module:
    """28.68M parameters at 1000 classes."""
    return tvm.densenet161(weights=None, num_classes=num_classes, drop_rate=drop_rate)


@MODELS.register("efficientnet_b0", input="imagenet", activation="silu", family="efficientnet",
                 source="torchvision", reuses_activation=False, inplace_activation=True,
                 blocks=(tvm.efficientnet.MBConv, tvm.efficientnet.FusedMBConv))
def efficientnet_b0(num_classes: int, dropout: float = 0.2,
                    stochastic_depth_prob: float = 0.2) -> nn.Module:
    """5.29M parameters at 1000 classes."""
    return tvm.efficientnet_b0(weights=None, num_classes=num_classes, dropout=dropout,
                               stochastic_depth_prob=stochastic_depth_prob)


@MODELS.register("convnext_tiny", input="imagenet", activation="gelu", family="convnext",
                 source="torchvision", reuses_activation=False, inplace_activation=False,
                 blocks=(tvm.convnext.CNBlock,))
def convnext_tiny(num_classes: int, stochastic_depth_prob: float = 0.1) -> nn.Module:
    """28.59M parameters at 1000 classes."""
    return tvm.convnext_tiny(weights=None, num_classes=num_classes,
                             stochastic_depth_prob=stochastic_depth_prob)
