"""airbench94 (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", arXiv 2404.00498): a
small VGG-like net of GELUs, a frozen patch-whitening first conv and BatchNorms without a trained scale.

The facts below are read from the public script `airbench94.py` of github.com/KellerJordan/cifar10-airbench
(commit 01a2367, with `legacy/airbench94.py` at 1b8f794 agreeing) -- its `hyp['net']`, `BatchNorm`, `Conv`,
`ConvGroup`, `make_net` and `init_whitening_conv`. The layer list below has 1,972,792 parameters, the
1.97M quoted for the paper's network:

- whitening conv: 2x2, no padding, 3 -> 2 * 3 * 2 * 2 = 24 channels, with a bias (zero at init); its
  weight frozen from the start (`requires_grad = False` in make_net), set from the first 5000 training
  images (the registered `data_init`, which actmem.train runs before strategies apply). The bias trains
  for the first `whiten_bias_epochs` = 3 epochs and is then frozen: a schedule for the runner
  (`optim.groups` in configs/experiment/airbench94.yaml), not the model.
  Followed by a GELU. 32x32 input gives 31x31 maps.
- three blocks (`ConvGroup`) of widths 64, 256, 256 (`base_width` 64 times 1, 4, 4): conv 3x3 ('same',
  i.e. padding 1, no bias) -> MaxPool2d(2) -> BatchNorm -> GELU -> conv 3x3 -> BatchNorm -> GELU
  (31 -> 15 -> 7 -> 3). The script calls one GELU module twice; here each use has its own.
- BatchNorm: eps 1e-12, `batchnorm_momentum` 0.6 in the script's convention (the weight of the old
  running value), passed to PyTorch as momentum = 1 - 0.6 = 0.4; weight (scale) frozen at 1, bias
  trained (the script's optimizer gives the BN biases 64x the learning rate, `bias_scaler`).
- head: MaxPool2d(3) (global on the 3x3 map), flatten, Linear(256, 10, bias=False), times
  `scaling_factor` 1/9.
- init: PyTorch's default for every conv and the linear, conv biases zeroed, then the first c_in filters
  of every conv set to the identity (`dirac_`), so each conv starts as a partial identity.

Deviations: parameters are float32 (the script runs the net in fp16, channels-last, BNs in fp32);
`init_whitening_` computes the eigendecomposition in float64 (the script in float32), and over a batch in
chunks, with the same result up to rounding.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from actmem.core.errors import ConfigError
from actmem.models.base import MODELS

WIDTHS = (64, 256, 256)
WHITEN_KERNEL = 2
BN_MOMENTUM = 0.4  # PyTorch's convention; the script's batchnorm_momentum 0.6 is 1 - this
BN_EPS = 1e-12
SCALING_FACTOR = 1 / 9
WHITEN_EPS = 5e-4  # init_whitening_conv's default


def _batchnorm(channels: int, weight_trainable: bool) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
    bn.weight.requires_grad_(weight_trainable)
    return bn


class ConvGroup(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU (the script's ConvGroup)."""

    def __init__(self, in_planes: int, planes: int, bn_weight_trainable: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, 1, 1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = _batchnorm(planes, bn_weight_trainable)
        self.gelu1 = nn.GELU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _batchnorm(planes, bn_weight_trainable)
        self.gelu2 = nn.GELU()

    def forward(self, x):
        out = self.gelu1(self.bn1(self.pool(self.conv1(x))))
        return self.gelu2(self.bn2(self.conv2(out)))


class AirBench(nn.Module):
    """Whitening conv 2x2 + GELU, one ConvGroup per width, global max-pool, bias-free linear head, scaled
    logits. Built with a random (frozen) whitening conv: call `init_whitening_` before training."""

    def __init__(self, widths: tuple[int, ...], num_classes: int, scaling_factor: float = SCALING_FACTOR,
                 bn_weight_trainable: bool = False):
        super().__init__()
        whiten_width = 2 * 3 * WHITEN_KERNEL**2
        self.whiten = nn.Conv2d(3, whiten_width, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.gelu = nn.GELU()
        in_planes, groups = whiten_width, []
        for planes in widths:
            groups.append(ConvGroup(in_planes, planes, bn_weight_trainable))
            in_planes = planes
        self.layers = nn.Sequential(*groups)
        self.pool = nn.MaxPool2d(3)  # 3x3 -> 1x1 for 32x32 input: a global max-pool
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes, bias=False)
        self.scaling_factor = scaling_factor
        init_airbench_(self)

    def forward(self, x):
        out = self.layers(self.gelu(self.whiten(x)))
        return self.fc(self.flatten(self.pool(out))) * self.scaling_factor


@torch.no_grad()
def init_airbench_(model: nn.Module) -> None:
    """The script's init on top of PyTorch's defaults: conv biases zero, each conv's first c_in filters the
    identity (a conv with as many outputs as inputs starts as the identity map). BNs keep weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if m.bias is not None:
                m.bias.zero_()
            nn.init.dirac_(m.weight[: m.in_channels])


def _patches(images: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """Every stride-1 patch of [N, C, H, W] as rows [N * L, C * kh * kw], in the conv weight's order."""
    return F.unfold(images, kernel).transpose(1, 2).flatten(0, 1)


@torch.no_grad()
def init_whitening_(conv: nn.Conv2d, images: torch.Tensor, eps: float = WHITEN_EPS, chunk: int = 1000) -> None:
    """Set `conv` (3 -> 2 * 3 * k * k channels, k x k, no padding) to whiten the k x k patches of `images`,
    then freeze its weight; its bias is left as it is (zero from the builder, and trainable).

    The published method (airbench94.py's `init_whitening_conv`): Σ = E[p pᵀ] over every patch p of the
    batch (the second moment, not mean-centred), Σ = V diag(λ) Vᵀ; the filters are the eigenvectors scaled
    by 1/sqrt(λ + eps), largest λ first, then the same with the sign flipped (both halves through the
    GELU that follows keep the information of either sign). The first half maps the patches to a second
    moment diag(λ / (λ + eps)), about the identity.

    Call it once, before training and before any strategy is applied, with training images as the model
    will see them (normalized, not augmented) -- the script uses the first 5000 training images, mean/std
    normalized: `init_whitening_(model.whiten, normalize(train_images[:5000]))`. The covariance is
    accumulated `chunk` images at a time (in float64, on the images' device).
    """
    if not isinstance(conv, nn.Conv2d):
        raise ConfigError(f"init_whitening_ needs the model's first nn.Conv2d, not {type(conv).__name__}.")
    kh, kw = conv.kernel_size
    dim = conv.in_channels * kh * kw
    if conv.out_channels != 2 * dim or conv.groups != 1 or conv.padding not in ((0, 0), "valid"):
        raise ConfigError(f"init_whitening_: a {conv.in_channels} -> {conv.out_channels} conv of kernel "
                          f"{kh}x{kw} cannot whiten its patches; it needs {2 * dim} output channels "
                          "(both signs of each eigenvector), groups=1 and no padding.")
    if images.dim() != 4 or images.shape[1] != conv.in_channels or len(images) == 0:
        raise ConfigError(f"init_whitening_ needs a non-empty batch [N, {conv.in_channels}, H, W]; "
                          f"got shape {tuple(images.shape)}.")
    second_moment = torch.zeros(dim, dim, dtype=torch.float64, device=images.device)
    count = 0
    for part in images.split(chunk):
        p = _patches(part.double(), (kh, kw))
        second_moment += p.T @ p
        count += len(p)
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment / count)  # ascending
    filters = (eigenvectors / (eigenvalues + eps).sqrt()).T.flip(0)  # rows, largest eigenvalue first
    weight = torch.cat((filters, -filters)).reshape_as(conv.weight)
    conv.weight.copy_(weight.to(conv.weight.dtype))
    conv.weight.requires_grad_(False)


WHITEN_IMAGES = 5000  # the script initialises the whitening conv from the first 5000 training images


def whiten_from_data(model: AirBench, first_images) -> None:
    """The registered data init (actmem.models.init_from_data): the whitening conv from the first
    5000 normalised training images, as the script does before its first step."""
    init_whitening_(model.whiten, first_images(WHITEN_IMAGES))


@MODELS.register("airbench94", input="cifar", activation="gelu", family="airbench", blocks=(ConvGroup,),
                 data_init=whiten_from_data)
def airbench94(num_classes: int, batchnorm_weight_trainable: bool = False) -> AirBench:
    """1.97M parameters at 10 classes (1,972,792, of which 1,971,352 train: the whitening weight and
    the BN weights are frozen). The whitening conv is random until `init_whitening_` sets it from data.
    batchnorm_weight_trainable=True trains the BN scales too (the script freezes them)."""
    return AirBench(WIDTHS, num_classes, SCALING_FACTOR, batchnorm_weight_trainable)
