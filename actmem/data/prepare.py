"""`make data`: unpack the shared tarballs into data/ and build the CIFAR-10 pixel cache. Here rather than
in scripts/prepare_data.py because the data tests unpack the tarballs with the same code.

Idempotent: a dataset whose folder already holds the expected number of images is left alone. A missing
tarball is not an error: the message says how to get that dataset instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from actmem.data import cifar


@dataclass(frozen=True)
class Tarball:
    file: str
    folder: str  # under dest
    counts: dict[str, int]  # images per split folder, from ../shared/data/README.md
    how_to_get: str


TARBALLS = (
    Tarball("cifar10-jpg.tar.gz", "cifar10", {"train": 50_000, "test": 10_000},
            "CIFAR-10: train with dataset.download=true where there is network (torchvision fetches the "
            "official archive into dataset.root), or run torchvision.datasets.CIFAR10(ROOT, download=True) "
            "and set dataset.root=ROOT."),
    Tarball("imagenette-160.tar.gz", "imagenette", {"train": 9_469, "val": 3_925},
            "Imagenette: download imagenette2-160.tgz from fast.ai (github.com/fastai/imagenette), unpack it "
            "and set dataset=imagenet dataset.root=<its folder> (it has train/<wnid> and val/<wnid>)."),
)
NOT_SHARED = (
    "CIFAR-100: dataset=cifar100 dataset.download=true where there is network, or "
    "torchvision.datasets.CIFAR100(ROOT, download=True) and dataset.root=ROOT.",
    "ImageNet: request access at image-net.org, lay the images out as train/<wnid>/*.JPEG and "
    "val/<wnid>/*.JPEG (the validation set comes flat: sort it into class folders), then "
    "dataset=imagenet dataset.root=<that folder>.",
)


def count_images(folder: Path) -> dict[str, int]:
    return {split: sum(len(files) for _, _, files in os.walk(folder / split)) for split in ("train", "test", "val")}


def matches(folder: Path, tb: Tarball) -> bool:
    got = count_images(folder)
    return all(got[split] == n for split, n in tb.counts.items())


def unpack(archive: Path, folder: Path, tb: Tarball) -> None:
    """Extract into a sibling `.partial` folder, check the counts, then rename: an interrupted run leaves
    no half-filled dataset folder behind."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if shutil.which("tar"):  # several times faster than tarfile on 60k small files
        subprocess.run(["tar", "xzf", str(archive), "-C", str(partial)], check=True)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(partial, filter="data")
    if not matches(partial, tb):
        raise SystemExit(f"{archive} unpacked to {count_images(partial)} images, expected {tb.counts}; "
                         f"the tarball looks damaged: copy it again. ({partial} is left for inspection.)")
    partial.rename(folder)


def prepare(tb: Tarball, shared: Path, dest: Path) -> bool:
    """True if the dataset is in place afterwards."""
    folder, archive = dest / tb.folder, shared / tb.file
    if folder.exists():
        if matches(folder, tb):
            print(f"{folder}: already unpacked ({sum(tb.counts.values()):,} images), skipped.")
            return True
        raise SystemExit(f"{folder} exists but holds {count_images(folder)} images, not {tb.counts}: "
                         f"remove it and run `make data` again.")
    if not archive.is_file():
        print(f"{archive} not found, so {tb.folder} is not prepared. {tb.how_to_get}")
        return False
    t0 = time.perf_counter()
    unpack(archive, folder, tb)
    print(f"{folder}: unpacked {archive.name} ({sum(tb.counts.values()):,} images) in "
          f"{time.perf_counter() - t0:.1f} s.")
    return True


def build_cifar10_cache(folder: Path) -> None:
    """Decode the JPEGs once into folder/actmem-cache-*.pt, so the first training run starts at once."""
    t0 = time.perf_counter()
    (train, _), (test, _), _ = cifar.load("cifar10", folder, allow_download=False)
    print(f"{folder}: uint8 cache of {len(train):,} + {len(test):,} images ready "
          f"({time.perf_counter() - t0:.1f} s).")


def prepare_all(shared: Path, dest: Path) -> None:
    """Every shared dataset into `dest`, the CIFAR-10 cache, and how to get the datasets not shared."""
    ready = {tb.folder: prepare(tb, shared, dest) for tb in TARBALLS}
    if ready["cifar10"]:
        build_cifar10_cache(dest / "cifar10")
    print("Not provided by ../shared/data:\n  " + "\n  ".join(NOT_SHARED))
