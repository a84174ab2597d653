"""ImageNet (or any tree in its layout, e.g. Imagenette) through DataLoader workers.

Workers decode and crop to uint8; the batch goes to the device as uint8 and is normalised there.
Under data parallelism each rank reads only its shard: a DistributedSampler's per-epoch share of the
training set (reshuffled from (seed, epoch), so a resumed run reads the same), and a contiguous share
of the test set, without the padding with repeats a DistributedSampler would add, so that summing the
ranks' test counts counts every image once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from actmem.core.errors import ActmemError, DataNotFoundError
from actmem.data.loader import (
    DATASETS,
    DataBundle,
    DeviceLoader,
    Normalize,
    balanced_subset,
    check_train_size,
    contiguous_share,
    epoch_seed,
    list_class_folders,
    quiet_worker_signals,
    read_rgb,
    resolve_root,
    usable_cores,
)

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


class ImageFiles(Dataset):
    """(transformed image, label) of each image in `folder`'s class folders, in ImageFolder's layout, file
    types and order. Not ImageFolder itself: its listing follows links into loops and other classes,
    and a broken image fails in a worker without naming the file (see list_class_folders, read_rgb)."""

    def __init__(self, folder: Path, transform):
        self.folder, self.transform = folder, transform
        self.classes, self.files, self.targets = list_class_folders(folder, IMG_EXTENSIONS)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(read_rgb(self.folder / self.files[i])), self.targets[i]


def transforms(cfg, train: bool) -> v2.Compose:
    """PIL image (RGB: read_rgb converts greyscale and CMYK) -> uint8 C x size x size tensor."""
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
    data = ImageFiles(folder, transforms(cfg, train))
    k = cfg.train_subset if train else cfg.test_subset
    if k is not None:
        what = "dataset.train_subset" if train else "dataset.test_subset"
        data = Subset(data, balanced_subset(torch.tensor(data.targets), k, what).tolist())
    return data


def rank_share(data: Dataset, train: bool, *, seed: int, rank: int, world_size: int
               ) -> tuple[Dataset, Sampler | None]:
    """(dataset, sampler) of rank's part of `data`; a single process keeps DataLoader's own shuffle. The
    sampler's seed + epoch is epoch_seed(seed, epoch); drop_last gives every rank as many steps."""
    if world_size == 1:
        return data, None
    if train:
        return data, DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=True,
                                        seed=epoch_seed(seed, 0), drop_last=True)
    return Subset(data, range(*contiguous_share(len(data), rank, world_size))), None


@DATASETS.register("imagenet", schema=ImageNetConfig)
def build_imagenet(cfg, *, batch_size: int, device: torch.device, seed: int, rank: int = 0,
                   world_size: int = 1) -> DataBundle:
    train, test = split(cfg, train=True), split(cfg, train=False)
    classes, test_classes = ((d.dataset if isinstance(d, Subset) else d).classes for d in (train, test))
    if classes != test_classes:
        raise ActmemError(f"{cfg.root}/train and {cfg.root}/{cfg.val_dir} have different class folders; "
                          "both must hold the same <wnid> folders (fix the layout or dataset.val_dir).")
    check_train_size(len(train), batch_size, world_size)
    workers = max(0, min(cfg.workers, usable_cores()))
    norm = Normalize(MEAN, STD, device)

    def loader(data, train: bool) -> DeviceLoader:
        data, sampler = rank_share(data, train, seed=seed, rank=rank, world_size=world_size)
        dl = DataLoader(data, batch_size, shuffle=train and sampler is None, sampler=sampler, drop_last=train,
                        num_workers=workers, pin_memory=device.type == "cuda", generator=torch.Generator(),
                        worker_init_fn=quiet_worker_signals)
        return DeviceLoader(dl, norm, device, seed, rank=rank)

    return DataBundle(train=loader(train, True), test=loader(test, False), num_classes=len(classes),
                      image_shape=(3, cfg.image_size, cfg.image_size), train_size=len(train), test_size=len(test),
                      rank=rank, world_size=world_size)
