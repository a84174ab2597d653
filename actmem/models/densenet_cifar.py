"""DenseNet-BC-121 for CIFAR, as in kuangliu/pytorch-cifar and DIVISION's code: growth 32, a 3x3 stem
of 2x growth channels, no max-pool, compression 0.5 in the transitions."""
from __future__ import annotations

import torch
import torch.nn as nn

from actmem.models.base import MODELS, init_cnn_


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (4x growth), BN-ReLU-conv3x3 (growth); returns the new features ahead of the input."""

    def __init__(self, in_planes: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (compression), then 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(nn.Module):
    def __init__(self, block_config: list[int], growth: int, num_classes: int, reduction: float = 0.5):
        super().__init__()
        planes = 2 * growth
        self.conv1 = nn.Conv2d(3, planes, 3, 1, 1, bias=False)
        stages = []
        for i, n in enumerate(block_config):
            stages.append(nn.Sequential(*(DenseLayer(planes + j * growth, growth) for j in range(n))))
            planes += n * growth
            if i < len(block_config) - 1:
                stages.append(Transition(planes, int(planes * reduction)))
                planes = int(planes * reduction)
        self.layers = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(planes, num_classes)
        init_cnn_(self)

    def forward(self, x):
        out = self.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(self.flatten(self.avgpool(out)))


@MODELS.register("densenet121", input="cifar", activation="relu", family="densenet", blocks=(DenseLayer,))
def densenet121(num_classes: int) -> DenseNet:
    """6.96M parameters at 10 classes: dense blocks of 6, 12, 24, 16 layers."""
    return DenseNet([6, 12, 24, 16], 32, num_classes)
