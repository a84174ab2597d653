"""Post-activation CIFAR ResNets (He et al. 2015): `resnet18` (kuangliu/pytorch-cifar, as in DIVISION's
code) and `resnet20` (the paper's CIFAR net, 16-32-64, option-A shortcuts)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from actmem.core.errors import ConfigError
from actmem.models.base import MODELS, init_cnn_

SHORTCUTS = ("pad", "projection")


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample by the stride and zero-pad the new channels; no parameters."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride = stride
        self.pad = (0, 0, 0, 0, extra_channels // 2, extra_channels - extra_channels // 2)

    def forward(self, x):
        return F.pad(x[:, :, :: self.stride, :: self.stride], self.pad)


def _shortcut(in_planes: int, planes: int, stride: int, kind: str) -> nn.Module:
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    if kind == "pad":
        return PadShortcut(stride, planes - in_planes)
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "projection"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride, shortcut)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))

    def zero_init_last_(self) -> None:
        nn.init.zeros_(self.bn2.weight)


class ResNet(nn.Module):
    """3x3 stem (no max-pool), one stage per width, global average pool, linear head."""

    def __init__(self, num_blocks: list[int], widths: list[int], num_classes: int,
                 shortcut: str = "projection", zero_init_residual: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, in_planes = [], widths[0]
        for i, (n, planes) in enumerate(zip(num_blocks, widths)):
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            stages.append(nn.Sequential(*(BasicBlock(in_planes if j == 0 else planes, planes, s, shortcut)
                                          for j, s in enumerate(strides))))
            in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        init_cnn_(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    m.zero_init_last_()

    def forward(self, x):
        out = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.avgpool(out)))


@MODELS.register("resnet18", input="cifar", activation="relu", family="resnet", blocks=(BasicBlock,))
def resnet18(num_classes: int, zero_init_residual: bool = False) -> ResNet:
    """11.17M parameters at 10 classes; 1x1-conv + BN (option B) shortcuts."""
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, "projection", zero_init_residual)


@MODELS.register("resnet20", input="cifar", activation="relu", family="resnet", blocks=(BasicBlock,))
def resnet20(num_classes: int, shortcut: str = "pad", zero_init_residual: bool = False) -> ResNet:
    """0.27M parameters. shortcut="pad" is the paper's option A; "projection" is option B."""
    if shortcut not in SHORTCUTS:
        raise ConfigError(f"resnet20: shortcut={shortcut!r}; use one of {', '.join(SHORTCUTS)} "
                          "(model.kwargs.shortcut=pad is He et al.'s option A).")
    return ResNet([3, 3, 3], [16, 32, 64], num_classes, shortcut, zero_init_residual)
