"""Pre-activation ResNets (He et al. 2016, "Identity Mappings in Deep Residual Networks") for CIFAR.

Blocks keep the BN -> ReLU -> Conv order as attributes (bn1, relu1, conv1, ...) so BLPA can find the
chains by tracing. A projection shortcut takes the pre-activated tensor (relu1's output), as He et al.;
an identity shortcut takes the block input. The wide ResNets reuse these blocks (wide_resnet.py).
"""
from __future__ import annotations

import torch.nn as nn

from actmem.models.base import MODELS, init_cnn_


def _projection(in_planes: int, planes: int, stride: int) -> nn.Conv2d | None:
    if stride == 1 and in_planes == planes:
        return None
    return nn.Conv2d(in_planes, planes, 1, stride, bias=False)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-[dropout]-conv3x3 (dropout only in wide ResNets)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        # No module at all when off, so relu2 -> conv2 stays a chain in the traced graph.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.dropout is not None:
            out = self.dropout(out)
        return self.conv2(out) + shortcut

    def zero_init_last_(self) -> None:
        nn.init.zeros_(self.conv2.weight)


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3 (carries the stride), BN-ReLU-conv1x1 to 4x the width."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu3 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return out + shortcut

    def zero_init_last_(self) -> None:
        nn.init.zeros_(self.conv3.weight)


class PreActResNet(nn.Module):
    """conv3x3 stem, three stages (stride 1, 2, 2), final BN-ReLU, global average pool, linear head."""

    def __init__(self, block: type[nn.Module], blocks_per_stage: int, widths: list[int], num_classes: int,
                 zero_init_residual: bool = False, **block_kw):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        stages, in_planes = [], 16
        for i, planes in enumerate(widths):
            layers = []
            for j in range(blocks_per_stage):
                layers.append(block(in_planes, planes, 2 if i > 0 and j == 0 else 1, **block_kw))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        init_cnn_(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, block):
                    m.zero_init_last_()

    def forward(self, x):
        out = self.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(self.flatten(self.avgpool(out)))


@MODELS.register("preact_resnet56", input="cifar", activation="relu", family="preact_resnet",
                 blocks=(PreActBlock,))
def preact_resnet56(num_classes: int, zero_init_residual: bool = False) -> PreActResNet:
    """0.86M parameters: 3 stages x 9 basic blocks (6n+2 = 56), 16-32-64."""
    return PreActResNet(PreActBlock, 9, [16, 32, 64], num_classes, zero_init_residual)


@MODELS.register("preact_resnet164", input="cifar", activation="relu", family="preact_resnet",
                 blocks=(PreActBottleneck,))
def preact_resnet164(num_classes: int, zero_init_residual: bool = False) -> PreActResNet:
    """1.7M parameters: 3 stages x 18 bottlenecks (9n+2 = 164), widths 16-32-64 inside, 64-128-256 out."""
    return PreActResNet(PreActBottleneck, 18, [16, 32, 64], num_classes, zero_init_residual)
