"""What every dataset family shares: the registry, the bundle the trainer gets, and two loaders.

`TensorLoader` serves a dataset held whole in memory as uint8 (CIFAR, synthetic): on a GPU a step moves
no data, and augmentation (pad + crop, with zero or reflect padding, and a random or alternating flip)
is two gathers over the batch. `DeviceLoader` wraps a torch DataLoader of uint8 batches (ImageNet) and
moves them to the device. Both normalise on the device, and draw every random number from (seed, epoch)
-- alternating flips from the seed alone -- so a resumed run sees the same order and augmentation as an
uninterrupted one; `set_epoch(epoch, start_batch)` resumes mid-epoch with the batches the uninterrupted
epoch would have yielded from there.

Data-parallel training (rank r of world_size processes) gives each rank its own shard of every epoch
and a disjoint contiguous share of the test set; `batch_size` is the per-rank batch. TensorLoader's
ranks cut one shared order and augmentation into consecutive per-rank slices, so N ranks with batch b
train on exactly the samples of one process with batch N * b.

Image-folder trees (CIFAR's, ImageNet's) are listed by `list_class_folders` and decoded by `read_rgb`,
both of which name the file and the fix when the tree or an image is bad; `quiet_worker_signals`
keeps worker processes out of the runner's stop handling.
"""
from __future__ import annotations

import itertools
import math
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import to_absolute_path
from PIL import Image
from torch.utils.data import DistributedSampler

from actmem.core.errors import ConfigError, DataNotFoundError
from actmem.core.registry import Registry

DATASETS = Registry("dataset")


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """One RNG seed per (run seed, epoch): every epoch differs, and none depends on what ran before.
    `rank` gives data-parallel ranks their own streams where they must differ; rank 0's is the
    single-process seed. Ranks are 2**20 apart, not more: a CPU torch.Generator keeps only a seed's low
    32 bits, and no run reaches epoch 2**20."""
    return (seed * 1_000_003 + epoch + rank * 2**20) % 2**63


def contiguous_share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's part of range(n) as torch.tensor_split cuts it into world_size contiguous
    parts, the first n % world_size of them one longer: together they hold every index once."""
    size, longer = divmod(n, world_size)
    start = rank * size + min(rank, longer)
    return start, start + size + (rank < longer)


def check_train_size(n: int, batch_size: int, world_size: int) -> None:
    """ConfigError unless the training set fills at least one global batch (batch_size on each rank)."""
    if n >= batch_size * world_size:
        return
    if world_size == 1:
        raise ConfigError(f"The training set has {n} images, fewer than trainer.batch_size={batch_size}, so an "
                          "epoch would have no full batch: lower trainer.batch_size or raise dataset.train_subset.")
    raise ConfigError(f"The training set has {n} images, fewer than trainer.batch_size={batch_size} (per rank) x "
                      f"{world_size} ranks = {batch_size * world_size}, so an epoch would have no full batch: "
                      "lower trainer.batch_size or the number of ranks (--nproc_per_node), or raise "
                      "dataset.train_subset.")


def check_start_batch(start_batch: int, batches: int) -> None:
    if not 0 <= start_batch <= batches:
        raise ValueError(f"start_batch={start_batch}: an epoch of this loader has {batches} batches")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_root(root: str) -> Path:
    """A relative `dataset.root` means relative to where the user launched the command."""
    return Path(to_absolute_path(str(Path(root).expanduser())))


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def workers_start_quiet():
    """Around the start of worker processes that quiet_worker_signals initialises: a worker forked with
    SIGINT and SIGTERM blocked keeps them pending until it has replaced the runner's handlers that it
    inherits; the main process gets its own when it leaves this block."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def quiet_worker_signals(*_) -> None:
    """A DataLoader's worker_init_fn, a process pool's initializer: stopping the job is the main
    process's business. Forked workers inherit the runner's Python handlers (actmem.train's raise
    Interrupted), so a stopped job printed a traceback from every worker; and a scheduler's SIGTERM,
    which reaches every process of the job, killed DataLoader workers (torch's handler in them exits
    quietly only when the loader's own process sends it), so the runner saw a worker killed by a
    signal, a failed run, instead of its own interrupt. Here Ctrl-C (SIGINT, sent to the whole process
    group as well) is ignored: the main process alone stops, and shuts its workers down. SIGTERM, from
    anyone, ends the worker at once with status 0, as torch's handler does for the loader's own:
    Python's exit would wait for the worker's queue thread, which a stopped main process no longer
    drains. A worker started within workers_start_quiet gets the signals that came meanwhile now."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_at_once)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _exit_at_once(signum, frame):
    os._exit(0)


def read_rgb(path: str | Path) -> Image.Image:
    """The image at `path`, decoded now, in RGB (greyscale and CMYK converted). A truncated, foreign or
    unreadable file raises DataNotFoundError naming it: PIL's OSError names no file when it is a
    truncated one, and surfaces as a worker's traceback."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:  # PIL's UnidentifiedImageError is one; so are "image file is truncated" and EACCES
        raise DataNotFoundError(
            f"Could not read the image {path} ({e}): the file is truncated, damaged or not an image. "
            "Re-extract it from the dataset's archive (or copy it again), or delete it to train without it."
        ) from e


def list_class_folders(split_dir: Path, suffixes: tuple[str, ...]) -> tuple[list[str], list[str], list[int]]:
    """Class folders of `split_dir` sorted by name (-> label index), and the images under each (names
    ending in one of `suffixes`, any case; subfolders included) as paths relative to split_dir, in
    ImageFolder's order, with their labels.

    ImageFolder follows every symbolic link (os.walk(followlinks=True)): a link that loops back repeats
    a class's images dozens of times, and a link into another class folder files its images under two
    labels, both silently. Links are followed here too (subsets made of links to another copy's folders
    or files are common), but every folder and image is read once: a second path to one (a loop, two
    class folders that are one, a link to another class's image) is refused, naming both, as are a link
    to an image that leads nowhere and an empty class folder. A DataNotFoundError says which and how.
    """
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise DataNotFoundError(f"{split_dir} holds no class folders; its images belong in {split_dir}/<class>/, one "
                                "folder per class. Unpack the dataset again, or point dataset.root=... at the dataset.")
    folders: dict[str, str] = {}  # real path of each folder read -> its path relative to split_dir
    linked: dict[str, str] = {}  # real path of each image reached through a link -> the link, likewise
    files, labels = [], []
    for label, c in enumerate(classes):
        found = sorted(_walk(split_dir, c, os.path.realpath(split_dir / c), suffixes, folders, linked))
        if not found:
            raise DataNotFoundError(
                f"The class folder {split_dir / c} holds no images (files ending in {', '.join(suffixes)}), so "
                "its class would have no examples. Delete the folder if the class does not belong in the "
                "dataset, or put its images back (unpack the dataset again).")
        files += [f"{folder}/{name}" for folder, name in found]
        labels += [label] * len(found)
    for real, link in linked.items():  # a linked image that a folder read holds as well
        folder, name = os.path.split(real)
        if folder in folders and name.lower().endswith(suffixes):
            raise _read_twice("image", split_dir / link, split_dir / folders[folder] / name, real)
    return classes, files, labels


def _walk(split_dir: Path, rel: str, real: str, suffixes: tuple[str, ...], folders: dict[str, str],
          linked: dict[str, str]) -> list[tuple[str, str]]:
    """(folder, name) of each image under split_dir/rel, whose real path is `real`; list_class_folders'
    rules. Only links cost a realpath: a plain entry's real path is its folder's plus its name."""
    if real in folders:
        raise _read_twice("folder", split_dir / rel, split_dir / folders[real], real)
    folders[real] = rel
    found = []
    for e in os.scandir(split_dir / rel):
        link = e.is_symlink()
        target = os.path.realpath(e.path) if link else f"{real}/{e.name}"
        if os.path.isdir(target) if link else e.is_dir():  # (a link loop makes DirEntry.is_dir raise)
            found += _walk(split_dir, f"{rel}/{e.name}", target, suffixes, folders, linked)
        elif e.name.lower().endswith(suffixes):
            if link:
                if not os.path.isfile(target):
                    raise DataNotFoundError(
                        f"{e.path} is a symbolic link to {os.readlink(e.path)}, which is no file (missing, or "
                        "links that loop back). Point the link at the image, or delete it.")
                if target in linked:
                    raise _read_twice("image", Path(e.path), split_dir / linked[target], target)
                linked[target] = f"{rel}/{e.name}"
            found.append((rel, e.name))
    return found


def _read_twice(what: str, path: Path, first: Path, real: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"{path} and {first} are one {what} ({real}), reached twice through a symbolic link (a link that "
        f"loops back, or a second link to it): the {what} would count twice, and under two labels when the "
        "paths are in different class folders. Remove the link, or replace it by a copy where an image "
        "belongs to both classes.")


class Normalize:
    """uint8 NCHW -> float32 (x / 255 - mean) / std, as one multiply-add on the batch's device."""

    def __init__(self, mean, std, device: torch.device):
        mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), mean / std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mul_(self.scale).sub_(self.shift)


PADDING_MODES = ("zeros", "reflect")
FLIPS = ("random", "alternating", "none")


def check_augmentation(crop_padding: int, padding_mode: str, flip: str, image_side: int | None = None) -> None:
    """ConfigError for options TensorLoader cannot apply. `image_side` (the smaller of H, W) bounds a
    reflect padding; callers that have not loaded the images yet leave it out."""
    if padding_mode not in PADDING_MODES:
        raise ConfigError(f"dataset.padding_mode={padding_mode!r}: use zeros or reflect.")
    if flip not in FLIPS:
        raise ConfigError(f"dataset.flip={flip!r}: use random, alternating or none.")
    if crop_padding < 0:
        raise ConfigError(f"dataset.crop_padding={crop_padding}: use 0 (no translation) or more, e.g. 4.")
    if padding_mode == "reflect" and image_side is not None and crop_padding >= image_side:
        raise ConfigError(f"dataset.crop_padding={crop_padding} with dataset.padding_mode='reflect': a reflection "
                          f"cannot reach past the other edge, so the padding must be below the image side, "
                          f"{image_side}.")


def reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Coordinates in [-(n-1), 2(n-1)] mirrored into [0, n) without repeating the edge (F.pad's 'reflect')."""
    return n - 1 - (n - 1 - i.abs()).abs()


def pad_crop_flip(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                  padding_mode: str = "zeros"):
    """Pad by `pad`, crop back to H x W at offsets (dy, dx) in [0, 2 pad], mirror where `flip`: the
    standard CIFAR augmentation for a whole batch as two gathers (rows, then columns), no per-image
    Python. (One 4-D advanced index does the same ~8x slower on CPU.) Reflect padding makes no padded
    copy: the gathers read the reflected coordinates straight from `x`."""
    b, c, h, w = x.shape
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]
    if padding_mode == "reflect":
        rows, cols = reflect(rows - pad, h), reflect(cols - pad, w)
    else:
        x = F.pad(x, (pad, pad, pad, pad))
    x = x.gather(2, rows[:, None, :, None].expand(b, c, h, x.shape[3]))
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

    train=True: a fresh permutation from (seed, epoch) and drop_last. With augment, each image is padded
    by `crop_padding` (zeros or reflect) and cropped back at a random offset, then mirrored per `flip`:
    "random" draws each image's flip every epoch (p=1/2); "alternating" (airbench94's) draws one flip per
    image from the seed alone and mirrors all images on odd epochs, so each image alternates orientation
    -- more diverse than random flips; "none" never mirrors. train=False: in order, every image, no
    augmentation.

    Of world_size ranks, each draws the same permutation and augmentation; step i's global batch is
    positions [i G, (i + 1) G) of the epoch's order (G = batch_size * world_size, drop_last on it) and
    rank r takes its r-th slice of batch_size. The test set is cut into world_size contiguous shares
    (`contiguous_share`), each served in order.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, normalize: Normalize,
                 *, train: bool, augment: bool = False, seed: int = 0, crop_padding: int = 4,
                 padding_mode: str = "zeros", flip: str = "random", rank: int = 0, world_size: int = 1):
        check_augmentation(crop_padding, padding_mode, flip, min(images.shape[-2:]))
        self.images, self.labels, self.batch_size, self.normalize = images, labels, batch_size, normalize
        self.train, self.augment, self.seed = train, augment and train, seed
        self.crop_padding, self.padding_mode, self.flip = crop_padding, padding_mode, flip
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Serve epoch `epoch` from its batch `start_batch` (0-based) on: the batches an uninterrupted pass
        yields from there, computed without the ones before. len() stays the whole epoch's."""
        check_start_batch(start_batch, len(self))
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        if self.train:
            return len(self.labels) // (self.batch_size * self.world_size)
        start, stop = contiguous_share(len(self.labels), self.rank, self.world_size)
        return math.ceil((stop - start) / self.batch_size)

    def __iter__(self):
        return self.train_batches() if self.train else self.test_batches()

    def train_batches(self):
        n, bs, dev = len(self.labels), self.batch_size, self.images.device
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g)
        if self.augment:
            dy, dx = torch.randint(0, 2 * self.crop_padding + 1, (2, n), generator=g).to(dev)
            flip = self.draw_flips(order, g).to(dev)
        order = order.to(dev)
        global_batch, offset = bs * self.world_size, bs * self.rank
        for i in range(self.start_batch, len(self)):
            at = slice(i * global_batch + offset, i * global_batch + offset + bs)
            idx = order[at]
            x, y = self.images[idx], self.labels[idx]
            if self.augment:
                x = pad_crop_flip(x, self.crop_padding, dy[at], dx[at], flip[at], self.padding_mode)
            yield self.normalize(x), y

    def test_batches(self):
        start, stop = contiguous_share(len(self.labels), self.rank, self.world_size)
        for i in range(self.start_batch, len(self)):
            at = slice(start + i * self.batch_size, min(start + (i + 1) * self.batch_size, stop))
            yield self.normalize(self.images[at]), self.labels[at]

    def first_images(self, n: int) -> torch.Tensor:
        """The first n images in dataset order, normalised, not augmented: what a model's data-dependent
        init reads (actmem.models.init_from_data)."""
        return self.normalize(self.images[:n])

    def draw_flips(self, order: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Whether to mirror the image at each position of this epoch's `order`."""
        n = len(order)
        if self.flip == "random":
            return torch.randint(0, 2, (n,), generator=g).bool()
        if self.flip == "alternating":  # the epoch before the first: a stream no epoch of this run uses
            base = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(epoch_seed(self.seed, -1)))
            return base.bool()[order] ^ (self.epoch % 2 == 1)
        return torch.zeros(n, dtype=torch.bool)


class DeviceLoader:
    """A torch DataLoader of uint8 batches, moved to `device` and normalised there (a quarter of the
    float32 transfer). Its generator, which drives the workers' augmentation seeds (and the shuffle of a
    single process), is reset from (seed, epoch, rank) at each pass: ranks crop differently, and
    reproducibly. A DistributedSampler (a data-parallel rank's shard) gets the epoch too.

    A mid-epoch start (set_epoch's start_batch) reads and drops the batches before it, without moving
    them to the device: each worker's random stream runs through every batch it serves, so starting
    the sampler later would hand later batches other augmentation draws than the uninterrupted epoch's.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, normalize: Normalize, device: torch.device,
                 seed: int, *, rank: int = 0):
        self.loader, self.normalize, self.device, self.seed, self.rank = loader, normalize, device, seed, rank
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Serve epoch `epoch` from its batch `start_batch` (0-based) on. len() stays the whole epoch's."""
        check_start_batch(start_batch, len(self))
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.loader.generator.manual_seed(epoch_seed(self.seed, self.epoch, self.rank))
        if isinstance(self.loader.sampler, DistributedSampler):
            self.loader.sampler.set_epoch(self.epoch)
        with workers_start_quiet():
            batches = iter(self.loader)
        try:
            for x, y in itertools.islice(batches, self.start_batch, None):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                yield self.normalize(x), y
        except DataNotFoundError as e:
            # torch raises a worker's error again here with the worker's traceback for its message; the
            # runner prints the message, so keep the paragraph the worker raised (the traceback's last line)
            raise DataNotFoundError(str(e).rsplit("DataNotFoundError: ", 1)[-1].strip()) from e


Loader = TensorLoader | DeviceLoader


@dataclass
class DataBundle:
    train: Loader  # this rank's shard: augmented, shuffled from (seed, epoch), drop_last; len() = steps per epoch
    test: Loader  # this rank's contiguous share, in order; the ranks' shares hold every image once
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W) of the batches
    train_size: int  # the whole dataset's, over all ranks
    test_size: int
    rank: int = 0
    world_size: int = 1


def tensor_bundle(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], *,
                  num_classes: int, mean, std, augment: bool, batch_size: int, device: torch.device,
                  seed: int, crop_padding: int = 4, padding_mode: str = "zeros", flip: str = "random",
                  rank: int = 0, world_size: int = 1) -> DataBundle:
    """A DataBundle of two TensorLoaders over uint8 (images, labels) pairs, moved to `device` once (every
    rank holds the whole set); the augmentation options (see TensorLoader) apply to the training loader."""
    (xtr, ytr), (xte, yte) = ((x.to(device), y.to(device)) for x, y in (train, test))
    check_train_size(len(ytr), batch_size, world_size)
    norm = Normalize(mean, std, device)
    ranks = {"rank": rank, "world_size": world_size}
    return DataBundle(
        train=TensorLoader(xtr, ytr, batch_size, norm, train=True, augment=augment, seed=seed,
                           crop_padding=crop_padding, padding_mode=padding_mode, flip=flip, **ranks),
        test=TensorLoader(xte, yte, batch_size, norm, train=False, **ranks),
        num_classes=num_classes, image_shape=tuple(xtr.shape[1:]), train_size=len(ytr), test_size=len(yte),
        **ranks)
