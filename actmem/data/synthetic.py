"""Random images and labels of any shape and class count, fixed by the seed: for tests and benchmarks."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from actmem.core.errors import ConfigError
from actmem.data.loader import DATASETS, DataBundle, tensor_bundle


@dataclass
class SyntheticConfig:
    name: str = "synthetic"
    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    train_size: int = 512
    test_size: int = 256
    # CIFAR's augmentation options (actmem.data.cifar.CifarConfig), off by default: presets that set them
    # (experiment=airbench94) also run on synthetic data
    augment: bool = False
    crop_padding: int = 4
    padding_mode: str = "zeros"
    flip: str = "random"


@DATASETS.register("synthetic", schema=SyntheticConfig)
def build_synthetic(cfg, *, batch_size: int, device: torch.device, seed: int, rank: int = 0,
                    world_size: int = 1) -> DataBundle:
    for key in ("num_classes", "image_size", "channels", "train_size", "test_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"dataset.{key}={getattr(cfg, key)}: it must be a positive integer.")
    g = torch.Generator().manual_seed(seed)
    n = cfg.train_size + cfg.test_size
    images = torch.randint(0, 256, (n, cfg.channels, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g)
    k = cfg.train_size
    train, test = (images[:k], labels[:k]), (images[k:], labels[k:])
    # uniform bytes have mean 127.5 and std 255 / sqrt(12): normalised, each pixel has mean 0 and std 1
    return tensor_bundle(train, test, num_classes=cfg.num_classes, mean=(0.5,) * cfg.channels,
                         std=(12**-0.5,) * cfg.channels, augment=cfg.augment, batch_size=batch_size,
                         device=device, seed=seed, crop_padding=cfg.crop_padding, padding_mode=cfg.padding_mode,
                         flip=cfg.flip, rank=rank, world_size=world_size)
