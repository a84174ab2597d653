"""What every dataset family shares: the registry, the bundle the trainer gets, and two loaders.

`TensorLoader` serves a dataset held whole in memory as uint8 (CIFAR, synthetic): on a GPU a step moves
no data, and augmentation is two gathers over the batch. `DeviceLoader` wraps a torch DataLoader of
uint8 batches (ImageNet) and moves them to the device. Both normalise on the device, both shuffle from
(seed, epoch) alone, so a resumed run sees the same order as an uninterrupted one.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import to_absolute_path

from actmem.errors import ConfigError
from actmem.registry import Registry

DATASETS = Registry("dataset")


def epoch_seed(seed: int, epoch: int) -> int:
    """One RNG seed per (run seed, epoch): every epoch differs, and none depends on what ran before."""
    return (seed * 1_000_003 + epoch) % 2**63


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_root(root: str) -> Path:
    """A relative `dataset.root` means relative to where the user launched the command."""
    return Path(to_absolute_path(str(Path(root).expanduser())))


class Normalize:
    """uint8 NCHW -> float32 (x / 255 - mean) / std, as one multiply-add on the batch's device."""

    def __init__(self, mean, std, device: torch.device):
        mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), mean / std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mul_(self.scale).sub_(self.shift)


def pad_crop_flip(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor):
    """Zero-pad by `pad`, crop back to H x W at offsets (dy, dx) in [0, 2 pad], mirror where `flip`:
    the standard CIFAR augmentation for a whole batch as two gathers (rows, then columns), no
    per-image Python. (One 4-D advanced index does the same ~8x slower on CPU.)"""
    b, c, h, w = x.shape
    x = F.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=x.device)
    x = x.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def balanced_subset(labels: torch.Tensor, k: int, what: str) -> torch.Tensor:
    """Indices (ascending) of k items taken round-robin over the classes, each class in a fixed random
    order: any k is class-balanced to within one, and the same for every run seed."""
    n = len(labels)
    if not 0 < k <= n:
        raise ConfigError(f"{what}={k}: it must be between 1 and the split's size, {n}; or null for all of it.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    lab = labels[perm]
    by_class = torch.argsort(lab, stable=True)
    counts = torch.bincount(lab)
    rank = torch.empty(n, dtype=torch.long)
    rank[by_class] = torch.arange(n) - (torch.cumsum(counts, 0) - counts)[lab[by_class]]
    order = torch.argsort(rank * (int(lab.max()) + 1) + lab)
    return perm[order[:k]].sort().values


class TensorLoader:
    """(images, labels) batches from uint8 NCHW images already on the training device.

    train=True: a fresh permutation from (seed, epoch) and drop_last; with augment, a 4-pixel pad +
    random crop and a horizontal flip drawn from the same generator. train=False: in order, every
    image, no augmentation.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, normalize: Normalize,
                 *, train: bool, augment: bool = False, seed: int = 0, pad: int = 4):
        self.images, self.labels, self.batch_size, self.normalize = images, labels, batch_size, normalize
        self.train, self.augment, self.seed, self.pad = train, augment and train, seed, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def __iter__(self):
        n, bs, dev = len(self.labels), self.batch_size, self.images.device
        if self.train:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=g).to(dev)
            if self.augment:
                dy, dx = torch.randint(0, 2 * self.pad + 1, (2, n), generator=g).to(dev)
                flip = torch.randint(0, 2, (n,), generator=g).bool().to(dev)
        for i in range(len(self)):
            at = slice(i * bs, (i + 1) * bs)
            idx = order[at] if self.train else at
            x, y = self.images[idx], self.labels[idx]
            if self.augment:
                x = pad_crop_flip(x, self.pad, dy[at], dx[at], flip[at])
            yield self.normalize(x), y


class DeviceLoader:
    """A torch DataLoader of uint8 batches, moved to `device` and normalised there (a quarter of the
    float32 transfer). Its generator, which drives both the shuffle and the workers' augmentation
    seeds, is reset from (seed, epoch) at each pass."""

    def __init__(self, loader: torch.utils.data.DataLoader, normalize: Normalize, device: torch.device,
                 seed: int):
        self.loader, self.normalize, self.device, self.seed = loader, normalize, device, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.loader.generator.manual_seed(epoch_seed(self.seed, self.epoch))
        for x, y in self.loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield self.normalize(x), y


Loader = TensorLoader | DeviceLoader


@dataclass
class DataBundle:
    train: Loader  # augmented, shuffled from (seed, epoch), drop_last; len() = steps per epoch
    test: Loader  # in order, every image; len() = batches
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W) of the batches
    train_size: int
    test_size: int


def tensor_bundle(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], *,
                  num_classes: int, mean, std, augment: bool, batch_size: int, device: torch.device,
                  seed: int) -> DataBundle:
    """A DataBundle of two TensorLoaders over uint8 (images, labels) pairs, moved to `device` once."""
    (xtr, ytr), (xte, yte) = ((x.to(device), y.to(device)) for x, y in (train, test))
    if len(ytr) < batch_size:
        raise ConfigError(f"The training set has {len(ytr)} images, fewer than trainer.batch_size={batch_size}, "
                          "so an epoch would have no full batch: lower trainer.batch_size or raise "
                          "dataset.train_subset.")
    norm = Normalize(mean, std, device)
    return DataBundle(
        train=TensorLoader(xtr, ytr, batch_size, norm, train=True, augment=augment, seed=seed),
        test=TensorLoader(xte, yte, batch_size, norm, train=False),
        num_classes=num_classes, image_shape=tuple(xtr.shape[1:]), train_size=len(ytr), test_size=len(yte))
