"""ImageNet (or any tree in its layout, e.g. Imagenette) through ImageFolder and DataLoader workers.

Workers decode and crop to uint8; the batch goes to the device as uint8 and is normalised there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from actmem.data.loader import (
    DATASETS,
    DataBundle,
    DeviceLoader,
    Normalize,
    balanced_subset,
    resolve_root,
    usable_cores,
)
from actmem.errors import ActmemError, ConfigError, DataNotFoundError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ImageNetConfig:
    name: str = "imagenet"
    root: str = "data/imagenet"  # holds train/<wnid>/*.JPEG and <val_dir>/<wnid>/*.JPEG
    image_size: int = 224
    test_resize: int | None = None  # shorter side before the centre crop; null: image_size * 256 / 224
    workers: int = 8  # DataLoader processes, clipped to the cores this process may use
    train_subset: int | None = None  # k class-balanced images from a fixed permutation; null: all
    test_subset: int | None = None
    val_dir: str = "val"


def transforms(cfg, train: bool) -> v2.Compose:
    """PIL image (RGB: ImageFolder converts greyscale and CMYK) -> uint8 C x size x size tensor."""
    size = cfg.image_size
    if train:
        steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(cfg.test_resize or round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([*steps, v2.PILToTensor()])


def split(cfg, train: bool):
    root = resolve_root(cfg.root)
    folder = root / ("train" if train else cfg.val_dir)
    if not folder.is_dir():
        raise DataNotFoundError(
            f"ImageNet not found: {folder} is missing. Expected ImageNet's folder layout, {root}/train/<wnid>/"
            f"*.JPEG and {root}/{cfg.val_dir}/<wnid>/*.JPEG. To fix: request access at image-net.org, lay "
            "the images out as train/<wnid>/ and val/<wnid>/ and set dataset.root=...; or, for the "
            "10-class Imagenette in that layout, run `make data` and set dataset.root=data/imagenette.")
    data = ImageFolder(str(folder), transform=transforms(cfg, train))
    k = cfg.train_subset if train else cfg.test_subset
    if k is not None:
        what = "dataset.train_subset" if train else "dataset.test_subset"
        data = Subset(data, balanced_subset(torch.tensor(data.targets), k, what).tolist())
    return data


@DATASETS.register("imagenet", schema=ImageNetConfig)
def build_imagenet(cfg, *, batch_size: int, device: torch.device, seed: int) -> DataBundle:
    train, test = split(cfg, train=True), split(cfg, train=False)
    classes, test_classes = ((d.dataset if isinstance(d, Subset) else d).classes for d in (train, test))
    if classes != test_classes:
        raise ActmemError(f"{cfg.root}/train and {cfg.root}/{cfg.val_dir} have different class folders; "
                          "both must hold the same <wnid> folders (fix the layout or dataset.val_dir).")
    if len(train) < batch_size:
        raise ConfigError(f"The training set has {len(train)} images, fewer than trainer.batch_size={batch_size}: "
                          "lower trainer.batch_size or raise dataset.train_subset.")
    workers = max(0, min(cfg.workers, usable_cores()))
    norm = Normalize(MEAN, STD, device)

    def loader(data, train: bool) -> DeviceLoader:
        dl = DataLoader(data, batch_size, shuffle=train, drop_last=train, num_workers=workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
        return DeviceLoader(dl, norm, device, seed)

    return DataBundle(train=loader(train, True), test=loader(test, False), num_classes=len(classes),
                      image_shape=(3, cfg.image_size, cfg.image_size), train_size=len(train), test_size=len(test))
