"""CIFAR-10/100 from torchvision's binary format or an image-folder tree, held whole in memory as uint8.

The image-folder tree (`train/<class>/*.jpg|png`, `test/<class>/*`; what `make data` unpacks; listed by
loader.list_class_folders, which refuses link loops and images reached twice) is decoded once into
`root/actmem-cache-<split>.pt` (about 7 s for 60k JPEGs on 2 cores) and loaded from there afterwards,
until the file list changes. The binary format's pickles are read by an unpickler that admits only
numpy arrays, so that a crafted file cannot run code.

Training augmentation defaults to the standard recipe (zero-pad 4, random crop, random flip);
airbench94's is crop_padding=2, padding_mode=reflect, flip=alternating.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from actmem.core.errors import ActmemError, DataNotFoundError
from actmem.data.loader import (
    DATASETS,
    balanced_subset,
    check_augmentation,
    list_class_folders,
    quiet_worker_signals,
    read_rgb,
    resolve_root,
    tensor_bundle,
    usable_cores,
    workers_start_quiet,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Spec:
    title: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    folder: str  # torchvision's binary format: the folder its archive unpacks to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    meta_file: str
    names_key: str
    torchvision_class: str
    shared_note: str  # how `make data` relates to this dataset


SPECS = {
    "cifar10": Spec("CIFAR-10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar-10-batches-py",
                    tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels", "batches.meta",
                    "label_names", "CIFAR10", "run `make data` (unpacks ../shared/data/cifar10-jpg.tar.gz into "
                    "data/cifar10)"),
    "cifar100": Spec("CIFAR-100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar-100-python",
                     ("train",), ("test",), "fine_labels", "meta", "fine_label_names", "CIFAR100",
                     "`make data` cannot help here: ../shared/data has no CIFAR-100"),
}


@dataclass
class CifarConfig:
    name: str = "cifar10"
    root: str = "data/cifar10"
    download: bool = False  # fetch torchvision's binary format into root (needs network)
    train_subset: int | None = None  # k class-balanced images from a fixed permutation; null: all
    test_subset: int | None = None
    augment: bool = True  # master switch for the three below (training set only)
    crop_padding: int = 4  # pad by this much, random crop back to 32x32; 0: no translation
    padding_mode: str = "zeros"  # zeros | reflect (F.pad's: the edge pixel is not repeated)
    # flip: random (each image, each epoch, p=1/2) | alternating (airbench94: a per-image flip drawn once
    # from the seed, and every image mirrored on odd epochs) | none
    flip: str = "random"


@dataclass
class Cifar100Config(CifarConfig):
    name: str = "cifar100"
    root: str = "data/cifar100"


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's pickles hold: dicts, lists, strings, numbers and numpy arrays.
    pickle.load (torchvision's reader) calls whatever a file names, so a crafted batch file could run
    any command; here any other name is refused."""

    ADMITTED = {("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"),  # as the original files (numpy 1) name it
                ("numpy._core.multiarray", "_reconstruct")}  # as numpy 2 writes it

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ADMITTED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR file holds")
        return super().find_class(module, name)


def load_pickle(path: Path):
    """The CIFAR pickle at `path` (Python 2's strings read as latin-1, as torchvision does)."""
    try:
        with open(path, "rb") as f:
            return CifarUnpickler(f, encoding="latin1").load()
    except Exception as e:  # refused, truncated or damaged: any of pickle's many errors
        raise DataNotFoundError(
            f"Could not load {path} as a CIFAR pickle ({type(e).__name__}: {e}); nothing it names was run. "
            f"Replace the folder {path.parent} with a fresh copy (unpack the dataset's archive again, or "
            "delete the folder and set dataset.download=true).") from e


def read_binary(folder: Path, spec: Spec):
    """torchvision's pickles: rows of 3072 bytes (R, G, B planes of 32x32) and a label list."""

    def split(files):
        blobs = [load_pickle(folder / f) for f in files]
        images = torch.from_numpy(np.concatenate([b["data"] for b in blobs])).view(-1, 3, 32, 32)
        labels = torch.tensor([y for b in blobs for y in b[spec.label_key]], dtype=torch.long)
        return images, labels

    meta = load_pickle(folder / spec.meta_file)
    return split(spec.train_files), split(spec.test_files), list(meta[spec.names_key])


def decode_chunk(paths: list[str]) -> np.ndarray:
    return np.stack([np.asarray(read_rgb(p)) for p in paths])


def decode_files(paths: list[str], chunk: int = 1000) -> torch.Tensor:
    """uint8 N x 3 x H x W of the images at `paths`, decoded by a pool of 2 processes per core: a cold
    page cache leaves them waiting on the disk as much as decoding. Workers use PIL and numpy only:
    a forked child that enters the parent's OpenMP pool (any torch op) can deadlock. An unreadable image
    raises read_rgb's DataNotFoundError, naming it. The pool is concurrent.futures', not
    multiprocessing.Pool: when a stopped job's workers die, one may hold the task queue's lock, and
    Pool's shutdown then waits for it forever."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(min(8, 2 * usable_cores()), multiprocessing.get_context(method),
                             initializer=quiet_worker_signals) as pool:
        with workers_start_quiet():  # the first submission starts the workers
            decoded = pool.map(decode_chunk, [paths[i : i + chunk] for i in range(0, len(paths), chunk)])
        parts = list(decoded)
    return torch.from_numpy(np.concatenate(parts)).permute(0, 3, 1, 2).contiguous()


def read_image_folder(split_dir: Path, cache: Path):
    """(uint8 N x 3 x H x W images, int64 labels, class names) of one split, through the cache file."""
    classes, files, labels = list_class_folders(split_dir, IMAGE_SUFFIXES)
    key = hashlib.sha256("\n".join(files).encode()).hexdigest()
    if cache.exists():
        try:
            blob = torch.load(cache, weights_only=True)
            if blob["key"] == key:
                return blob["images"], blob["labels"], blob["classes"]
        except Exception:  # a damaged or foreign cache file is rebuilt below
            pass
    try:
        images = decode_files([str(split_dir / f) for f in files])
    except ValueError as e:  # images of different sizes (an unreadable one raised DataNotFoundError)
        raise ActmemError(f"Could not decode {split_dir} into one tensor ({e}). CIFAR images must all be "
                          "32x32 JPEG/PNG files: re-create the folder from the original dataset.") from e
    blob = {"key": key, "images": images, "labels": torch.tensor(labels), "classes": classes}
    save_atomic(blob, cache)
    return blob["images"], blob["labels"], classes


def save_atomic(obj, path: Path) -> None:
    """Write to a temporary name beside `path`, then rename: readers never see half a file. A read-only
    data folder just goes without a cache."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def download(root: Path, spec: Spec) -> None:
    import torchvision.datasets

    try:
        getattr(torchvision.datasets, spec.torchvision_class)(str(root), train=True, download=True)
    except Exception as e:  # no network, a proxy, a full disk: the user needs the cause, not a traceback
        raise DataNotFoundError(f"dataset.download=true could not fetch {spec.title} into {root} ({e}). "
                                f"Download it where there is network and copy {root / spec.folder} over, "
                                "or point dataset.root=... at an existing copy.") from e


def load(name: str, root: Path, allow_download: bool):
    """((train images, labels), (test images, labels), class names) of cifar10 or cifar100 under root."""
    spec = SPECS[name]
    binary, folders = root / spec.folder, (root / "train", root / "test")
    has_folders = all(d.is_dir() for d in folders)
    if not binary.is_dir() and not has_folders and allow_download:
        download(root, spec)
    if binary.is_dir():
        train, test, classes = read_binary(binary, spec)
    elif has_folders:
        *train, classes = read_image_folder(folders[0], root / "actmem-cache-train.pt")
        *test, test_classes = read_image_folder(folders[1], root / "actmem-cache-test.pt")
        if test_classes != classes:
            raise ActmemError(f"{folders[0]} and {folders[1]} have different class folders; both must hold the "
                              f"same {spec.num_classes}.")
    else:
        raise DataNotFoundError(
            f"{spec.title} not found under {root}: expected torchvision's binary format ({binary}/) or the "
            f"image-folder layout ({root}/train/<class>/*.jpg|png and {root}/test/<class>/*). To fix: "
            f"{spec.shared_note}; or set dataset.download=true to fetch it with torchvision (needs network); "
            "or point dataset.root=... at a copy.")
    if len(classes) != spec.num_classes:
        raise ActmemError(f"{root} holds {len(classes)} classes, but {spec.title} has {spec.num_classes}: "
                          f"point dataset.root=... at {spec.title}, or pick the matching dataset=.")
    return tuple(train), tuple(test), classes


def build(name: str, cfg, *, batch_size: int, device: torch.device, seed: int, rank: int, world_size: int):
    spec = SPECS[name]
    check_augmentation(cfg.crop_padding, cfg.padding_mode, cfg.flip)  # before loading the images
    train, test, _ = load(name, resolve_root(cfg.root), cfg.download)
    if cfg.train_subset is not None:
        idx = balanced_subset(train[1], cfg.train_subset, "dataset.train_subset")
        train = (train[0][idx], train[1][idx])
    if cfg.test_subset is not None:
        idx = balanced_subset(test[1], cfg.test_subset, "dataset.test_subset")
        test = (test[0][idx], test[1][idx])
    return tensor_bundle(train, test, num_classes=spec.num_classes, mean=spec.mean, std=spec.std,
                         augment=cfg.augment, batch_size=batch_size, device=device, seed=seed,
                         crop_padding=cfg.crop_padding, padding_mode=cfg.padding_mode, flip=cfg.flip,
                         rank=rank, world_size=world_size)


@DATASETS.register("cifar10", schema=CifarConfig)
def build_cifar10(cfg, *, batch_size: int, device: torch.device, seed: int, rank: int = 0, world_size: int = 1):
    return build("cifar10", cfg, batch_size=batch_size, device=device, seed=seed, rank=rank, world_size=world_size)


@DATASETS.register("cifar100", schema=Cifar100Config)
def build_cifar100(cfg, *, batch_size: int, device: torch.device, seed: int, rank: int = 0, world_size: int = 1):
    return build("cifar100", cfg, batch_size=batch_size, device=device, seed=seed, rank=rank, world_size=world_size)
