import signal

import numpy as np
import pytest
import torch
from PIL import Image

from actmem.core.errors import DataNotFoundError
from actmem.data import DeviceLoader, build

CPU = torch.device("cpu")


def write_tree(root, wnids=("n01", "n02", "n03"), per_class=4):
    """A tiny ImageNet-layout tree of odd-sized JPEGs, one greyscale and one CMYK among them."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in wnids:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8))
                img = {0: img.convert("L"), 1: img.convert("CMYK")}.get(i, img)
                img.save(root / split / c / f"{i}.JPEG")


def imagenet(root, bs=4, seed=0, rank=0, world_size=1, **kw):
    cfg = {"name": "imagenet", "root": str(root), "image_size": 24, "workers": 2, **kw}
    return build(cfg, batch_size=bs, device=CPU, seed=seed, rank=rank, world_size=world_size)


def epoch(loader, e):
    loader.set_epoch(e)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_folder_layout_shapes_greyscale_and_cmyk(tmp_path):
    write_tree(tmp_path)
    b = imagenet(tmp_path, bs=5)
    assert isinstance(b.train, DeviceLoader)
    assert (b.num_classes, b.image_shape, b.train_size, b.test_size) == (3, (3, 24, 24), 12, 12)
    assert (len(b.train), len(b.test)) == (2, 3)  # train drops the last partial batch, test keeps it
    x, y = epoch(b.train, 0)
    assert x.shape == (10, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    xt, yt = epoch(b.test, 0)
    assert xt.shape == (12, 3, 24, 24) and torch.equal(yt, torch.arange(3).repeat_interleave(4))
    grey = xt[0] * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    assert torch.allclose(grey[0], grey[1], atol=1e-5) and torch.allclose(grey[0], grey[2], atol=1e-5)


def test_shuffle_and_augmentation_fixed_by_seed_and_epoch(tmp_path):
    write_tree(tmp_path)
    b = imagenet(tmp_path)
    x0, y0 = epoch(b.train, 0)
    x0b, y0b = epoch(b.train, 0)
    x1, _ = epoch(b.train, 1)
    xs, _ = epoch(imagenet(tmp_path, seed=1).train, 0)
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)
    assert not torch.equal(x0, x1) and not torch.equal(x0, xs)
    xt0, _ = epoch(b.test, 0)
    xt1, _ = epoch(b.test, 1)
    assert torch.equal(xt0, xt1)  # no augmentation at test time


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batches_are_moved_to_the_gpu(tmp_path):
    write_tree(tmp_path)
    cfg = {"name": "imagenet", "root": str(tmp_path), "image_size": 24, "workers": 2}
    cpu, gpu = (build(cfg, batch_size=4, device=d, seed=0) for d in ("cpu", "cuda"))
    assert gpu.test.loader.pin_memory
    (x, y), (xg, yg) = epoch(cpu.test, 0), epoch(gpu.test, 0)
    assert xg.device.type == "cuda" and yg.device.type == "cuda"
    torch.testing.assert_close(xg.cpu(), x)
    assert torch.equal(yg.cpu(), y)


def test_missing_imagenet_names_path_and_fixes(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        imagenet(tmp_path / "imagenet")
    msg = str(e.value)
    assert str(tmp_path / "imagenet" / "train") in msg and "val/<wnid>" in msg
    assert "image-net.org" in msg and "`make data`" in msg and "dataset.root=data/imagenette" in msg


def test_real_imagenette_loads_and_subsets(imagenette_root):
    b = imagenet(imagenette_root, bs=16, image_size=64)
    assert (b.num_classes, b.image_shape, b.train_size, b.test_size) == (10, (3, 64, 64), 9469, 3925)
    assert (len(b.train), len(b.test)) == (9469 // 16, -(-3925 // 16))
    it = iter(b.train)
    for _ in range(2):
        x, y = next(it)
        assert x.shape == (16, 3, 64, 64) and x.dtype == torch.float32 and 0 <= y.min() and y.max() < 10
        assert abs(x.mean().item()) < 1 and 0.5 < x.std().item() < 1.5
    del it
    x, y = next(iter(b.test))
    assert x.shape == (16, 3, 64, 64) and (y == 0).all()  # in order: the first class first

    s = imagenet(imagenette_root, bs=10, image_size=32, train_subset=50, test_subset=20)
    assert (s.train_size, s.test_size, len(s.train)) == (50, 20, 5)
    targets = torch.tensor(s.train.loader.dataset.dataset.targets)[s.train.loader.dataset.indices]
    assert torch.bincount(targets).tolist() == [5] * 10


def write_solid_tree(root, classes=3, per_class=6):
    """Train and val trees of one-colour PNGs, 12 grey levels apart: a crop or flip keeps the colour, so
    a batch's colours name its images. Returns each split's colours in ImageFolder's order."""
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"n{c}").mkdir(parents=True)
            for i in range(per_class):
                level = 12 * (c * per_class + i)
                Image.new("RGB", (30 + i, 40), (level,) * 3).save(root / split / f"n{c}" / f"{i}.png")
    return torch.arange(classes * per_class) * 12


def colours(x):
    """The grey level of each image of a normalised batch."""
    return (x[:, 0] * 0.229 * 255 + 0.485 * 255).mean((1, 2)).round().long()


def shards(root, e, world_size=2, split="train", **kw):
    """Each rank's images of epoch e, as colours."""
    ranks = [imagenet(root, bs=2, rank=r, world_size=world_size, **kw) for r in range(world_size)]
    return [colours(epoch(getattr(b, split), e)[0]) for b in ranks]


def test_ranks_read_disjoint_shards_reshuffled_per_epoch(tmp_path):
    every = write_solid_tree(tmp_path)
    b = imagenet(tmp_path, bs=2, rank=1, world_size=2)
    assert (b.train_size, b.test_size, len(b.train), len(b.test)) == (18, 18, 4, 5)  # 9 each: 4 batches of 2
    first = shards(tmp_path, 0)
    for shard in first:
        assert len(shard) == 8 and len(shard.unique()) == 8 and torch.isin(shard, every).all()
    assert not torch.isin(first[0], first[1]).any()
    assert all(torch.equal(a, b) for a, b in zip(first, shards(tmp_path, 0)))  # a resumed run reads the same
    assert not torch.equal(torch.cat(first), torch.cat(shards(tmp_path, 1)))
    assert not torch.equal(torch.cat(first), torch.cat(shards(tmp_path, 0, seed=1)))


def test_ranks_test_shares_cover_the_test_set_once_in_order(tmp_path):
    every = write_solid_tree(tmp_path)
    parts = shards(tmp_path, 0, world_size=4, split="test")
    assert [len(p) for p in parts] == [5, 5, 4, 4]
    assert torch.equal(torch.cat(parts), every)


def test_ranks_augment_differently_and_reproducibly(tmp_path):
    """Every file the same image: two ranks' batches differ only by their workers' random crops."""
    write_tree(tmp_path, per_class=1)
    image = tmp_path / "train" / "n01" / "0.JPEG"
    for c in ("n01", "n02", "n03"):
        for i in range(4):
            (tmp_path / "train" / c / f"{i}.JPEG").write_bytes(image.read_bytes())
    x0, x1 = (epoch(imagenet(tmp_path, rank=r, world_size=2).train, 0)[0] for r in range(2))
    assert x0.shape == (4, 3, 24, 24) and not torch.isclose(x0, x1).flatten(1).all(1).any()
    assert torch.equal(x1, epoch(imagenet(tmp_path, rank=1, world_size=2).train, 0)[0])
    assert not torch.equal(x1, epoch(imagenet(tmp_path, rank=1, world_size=2).train, 1)[0])


@pytest.mark.parametrize("world_size", [1, 2])
def test_start_batch_yields_the_rest_of_the_uninterrupted_epoch(tmp_path, world_size):
    write_tree(tmp_path, per_class=6)
    b = imagenet(tmp_path, bs=2, rank=world_size - 1, world_size=world_size)
    for loader, k in ((b.train, 2), (b.test, 3)):
        steps = len(loader)
        loader.set_epoch(1)
        full = list(loader)
        loader.set_epoch(1, start_batch=k)
        rest = list(loader)
        assert len(loader) == steps and len(rest) == steps - k > 0
        assert all(torch.equal(x, xf) and torch.equal(y, yf) for (x, y), (xf, yf) in zip(rest, full[k:]))


def legit_links(root):
    """Links the listing follows: a class folder, a subfolder and an image that live outside the tree.
    The training split then holds 12 + 2 + 1 images."""
    elsewhere = root / "elsewhere"
    (elsewhere / "more").mkdir(parents=True)
    (root / "train" / "n03").rename(elsewhere / "n03")
    (root / "train" / "n03").symlink_to(elsewhere / "n03")
    for i in range(2):
        (elsewhere / "more" / f"{i}.JPEG").write_bytes((root / "train" / "n01" / f"{i}.JPEG").read_bytes())
    (root / "train" / "n01" / "more").symlink_to(elsewhere / "more")
    (elsewhere / "one.JPEG").write_bytes((root / "train" / "n02" / "0.JPEG").read_bytes())
    (root / "train" / "n02" / "one.JPEG").symlink_to(elsewhere / "one.JPEG")


@pytest.mark.parametrize("link, target, says", [
    ("train/n01/again", ".", "one folder"),  # a loop: ImageFolder read n01 dozens of times over
    ("train/n02/up", "train", "one folder"),  # a loop through the split: n01's images under n02
    ("train/n02/extra", "train/n01", "one folder"),  # n01's images under n02 as well
    ("train/n04", "train/n01", "one folder"),  # a class folder twice
    ("train/n02/dup.JPEG", "train/n01/0.JPEG", "one image"),  # an image under two labels
    ("train/n02/ghost.JPEG", "train/nothing.JPEG", "which is no file"),  # failed mid-training
    ("train/n02/self.JPEG", "self.JPEG", "which is no file"),  # a link loop
])
def test_links_are_followed_but_every_image_is_read_once(tmp_path, link, target, says):
    write_tree(tmp_path)
    legit_links(tmp_path)
    assert imagenet(tmp_path).train_size == 15
    (tmp_path / link).symlink_to(target if target.startswith((".", "self")) else tmp_path / target)
    with pytest.raises(DataNotFoundError, match=says) as e:
        imagenet(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / link) in msg and "\n" not in msg
    if says != "which is no file":
        assert str(tmp_path / target.strip(".")) in msg and "Remove the link" in msg


def test_empty_class_folder_is_named_before_training(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "train" / "n00").mkdir()
    with pytest.raises(DataNotFoundError) as e:
        imagenet(tmp_path)
    msg = str(e.value)
    assert f"The class folder {tmp_path / 'train' / 'n00'} holds no images (files ending in .jpg," in msg
    assert "Delete the folder" in msg


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_image_in_a_worker_is_one_paragraph_naming_it(tmp_path, workers):
    write_tree(tmp_path)
    bad = tmp_path / "val" / "n02" / "2.JPEG"
    bad.write_bytes(bad.read_bytes()[:1000])  # past the header: PIL fails when it decodes
    b = imagenet(tmp_path, workers=workers)  # the listing does not open images: ImageNet has 1.3 million
    with pytest.raises(DataNotFoundError) as e:
        epoch(b.test, 0)
    msg = str(e.value)
    assert msg.startswith(f"Could not read the image {bad} (image file is truncated")
    assert "Re-extract it" in msg and "\n" not in msg and "Traceback" not in msg


@pytest.mark.parametrize("signame", ["INT", "TERM"])
def test_a_stopped_job_stops_in_the_runner_alone(tmp_path, signame, stopped_job):
    """Workers inherited the runner's handlers: each printed a traceback on Ctrl-C and died, and a
    scheduler's SIGTERM killed them (torch's handler in a worker lets only the loader's process end it
    quietly), so the runner reported a worker killed by a signal (a failed run) instead of its stop."""
    write_tree(tmp_path)
    job = stopped_job("""
        import time
        from actmem.data import build

        bundle = build({"name": "imagenet", "root": sys.argv[2], "image_size": 24, "workers": 2}, batch_size=2,
                       device="cpu", seed=0)
        batches = iter(bundle.train)
        next(batches)  # the workers are up
        try:
            stop_the_job()
            time.sleep(60)
        except Stopped as e:
            time.sleep(1)  # the runner records the stop, its loader still open: a dead worker shows here
            print("stopped by", e)
    """, signame, str(tmp_path))
    assert (job.returncode, job.stdout) == (0, f"stopped by {getattr(signal, 'SIG' + signame).value}\n"), job.stderr
    assert "Traceback" not in job.stderr, job.stderr
