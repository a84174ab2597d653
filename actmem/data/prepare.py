"""`make data`: unpack the shared tarballs into data/ and build the CIFAR-10 pixel cache. Here rather than
in scripts/prepare_data.py because the data tests unpack the tarballs with the same code.

Idempotent: a dataset whose folder already holds the expected number of images (or, for CIFAR-10,
torchvision's binary format) is left alone. CIFAR-10 is what `make run` and `make test` need: where the
shared folder lacks its tarball (a clone outside this workplace), torchvision fetches it into data/cifar10
in its binary format, and where that fails too (no network) `make data` stops with one paragraph saying
what to do. Any other missing tarball is not an error: the message says how to get that dataset instead.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path

from actmem.data import cifar


@dataclass(frozen=True)
class Tarball:
    file: str
    folder: str  # under dest
    counts: dict[str, int]  # images per split folder, from ../shared/data/README.md
    how_to_get: str
    fetch: str | None = None  # a cifar.SPECS name: torchvision fetches it where the tarball is missing


TARBALLS = (
    Tarball("cifar10-jpg.tar.gz", "cifar10", {"train": 50_000, "test": 10_000},
            "CIFAR-10: train with dataset.download=true where there is network (torchvision fetches the "
            "official archive into dataset.root), or run torchvision.datasets.CIFAR10(ROOT, download=True) "
            "and set dataset.root=ROOT.", fetch="cifar10"),
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


def has_binary(folder: Path, tb: Tarball) -> bool:
    """Whether `folder` holds the dataset in torchvision's binary format (what `fetch` leaves)."""
    if tb.fetch is None:
        return False
    spec = cifar.SPECS[tb.fetch]
    return all((folder / spec.folder / f).is_file() for f in (*spec.train_files, *spec.test_files, spec.meta_file))


def prepare(tb: Tarball, shared: Path, dest: Path) -> bool:
    """True if the dataset is in place afterwards."""
    folder, archive = dest / tb.folder, shared / tb.file
    if folder.exists():
        if matches(folder, tb):
            print(f"{folder}: already unpacked ({sum(tb.counts.values()):,} images), skipped.")
            return True
        if has_binary(folder, tb):
            print(f"{folder}: already holds {cifar.SPECS[tb.fetch].title} in torchvision's binary format, skipped.")
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


def fetch(tb: Tarball, shared: Path, dest: Path, timeout_s: float = 60) -> None:
    """The dataset fetched by torchvision into dest/<folder> in its binary format (through a sibling
    `.partial` folder, renamed when complete; torchvision's archive is deleted once unpacked). Where that
    fails -- no network, a proxy, a full disk -- SystemExit with one paragraph saying what to do instead,
    and nothing left behind."""
    import torchvision.datasets

    from actmem.core.errors import paragraph

    spec = cifar.SPECS[tb.fetch]
    folder = dest / tb.folder
    partial = folder.with_name(folder.name + ".partial")
    print(f"{shared / tb.file} not found: fetching {spec.title} with torchvision into {folder} "
          "(170 MB; needs network).", flush=True)
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.perf_counter()
    previous_timeout = socket.getdefaulttimeout()
    try:
        partial.mkdir(parents=True)
        socket.setdefaulttimeout(timeout_s)  # a network that swallows packets fails, not hangs
        with redirect_stderr(sys.stdout):  # torchvision's progress; stderr is left for the error
            dataset = getattr(torchvision.datasets, spec.torchvision_class)
            dataset(str(partial), train=True, download=True)
        if not has_binary(partial, tb):
            raise RuntimeError(f"the download left no complete {spec.folder}/ in {partial}")
    except Exception as e:
        shutil.rmtree(partial, ignore_errors=True)
        cause = " ".join(f"{type(e).__name__}: {e}".split())
        raise SystemExit(paragraph(
            f"make data: no {spec.title}, which `make run` and `make test` train on. {shared / tb.file} is not "
            f"there, and fetching {spec.title} with torchvision failed ({cause}), most likely because this "
            f"machine has no network. To fix, any one of: run `make data SHARED=<folder holding {tb.file}>`; "
            f"run `make data` where there is network (torchvision fetches it into {folder}); or put a copy "
            f"into {folder} yourself, in torchvision's binary format ({folder / spec.folder}/) or as "
            f"{folder}/train/<class>/*.png|jpg and {folder}/test/<class>/*.")) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    archive = getattr(dataset, "filename", None)
    if archive:
        (partial / archive).unlink(missing_ok=True)
    partial.rename(folder)
    print(f"{folder}: fetched {spec.title} in torchvision's binary format ({time.perf_counter() - t0:.0f} s).")


def build_cifar10_cache(folder: Path) -> None:
    """Decode the JPEGs once into folder/actmem-cache-*.pt, so the first training run starts at once."""
    t0 = time.perf_counter()
    (train, _), (test, _), _ = cifar.load("cifar10", folder, allow_download=False)
    print(f"{folder}: uint8 cache of {len(train):,} + {len(test):,} images ready "
          f"({time.perf_counter() - t0:.1f} s).")


def prepare_all(shared: Path, dest: Path) -> None:
    """Every shared dataset into `dest` and the CIFAR-10 cache; CIFAR-10 fetched by torchvision where
    `shared` lacks its tarball (SystemExit saying what to do where that fails); how to get the rest."""
    for tb in TARBALLS:
        folder = dest / tb.folder
        if tb.fetch and not folder.exists() and not (shared / tb.file).is_file():
            fetch(tb, shared, dest)
        elif prepare(tb, shared, dest) and tb.folder == "cifar10" and matches(folder, tb):
            build_cifar10_cache(folder)  # the image folders; the binary format needs no cache
    print("Not provided by ../shared/data:\n  " + "\n  ".join(NOT_SHARED))
