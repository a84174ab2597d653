import io
import os
import pickle
import shutil
import signal
import struct

import pytest
import torch
import torchvision.datasets
from PIL import Image

from actmem.core.errors import ActmemError, ConfigError, DataNotFoundError
from actmem.data import build
from actmem.data.cifar import SPECS, decode_files
from actmem.data.loader import Normalize

CPU = torch.device("cpu")


def fake_images(n, seed):
    """Random 32x32 images whose red channel's first pixel encodes the index (to follow labels)."""
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    x[:, 0, 0, 0] = torch.arange(n) % 256
    return x


def write_binary(root, name, n_train, n_test):
    """A small dataset in torchvision's pickle format (cifar-10-batches-py / cifar-100-python)."""
    spec = SPECS[name]
    folder = root / spec.folder
    folder.mkdir(parents=True)
    k = spec.num_classes
    splits = {}
    for files, n, seed in ((spec.train_files, n_train, 0), (spec.test_files, n_test, 1)):
        x, y = fake_images(n, seed), torch.arange(n) % k
        splits[files] = (x, y)
        for part, (xs, ys) in zip(files, zip(x.chunk(len(files)), y.chunk(len(files)))):
            blob = {"data": xs.reshape(len(xs), -1).numpy(), spec.label_key: ys.tolist()}
            (folder / part).write_bytes(pickle.dumps(blob))
    (folder / spec.meta_file).write_bytes(pickle.dumps({spec.names_key: [f"class{i}" for i in range(k)]}))
    return splits[spec.train_files], splits[spec.test_files]


def write_png(img, path):
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)


def write_folder(root, classes, per_class, split):
    """root/split/<class>/<i>.png, with every pixel of channel 0 equal to the class's sorted index."""
    for label, c in enumerate(sorted(classes)):
        (root / split / c).mkdir(parents=True)
        for i in range(per_class):
            img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
            img[0] = label
            write_png(img, str(root / split / c / f"{i}.png"))


def collect(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_torchvision_binary_format(tmp_path, name):
    (xtr, ytr), (xte, yte) = write_binary(tmp_path, name, 200, 120)
    b = build({"name": name, "root": str(tmp_path)}, batch_size=32, device=CPU, seed=0)
    k = SPECS[name].num_classes
    assert (b.num_classes, b.image_shape, b.train_size, b.test_size) == (k, (3, 32, 32), 200, 120)
    assert (len(b.train), len(b.test)) == (6, 4)
    x, y = collect(b.test)
    assert torch.equal(y, yte)
    torch.testing.assert_close(x, Normalize(SPECS[name].mean, SPECS[name].std, CPU)(xte))
    x, y = next(iter(b.train))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= y.min() and y.max() < k


def test_ranks_reach_the_loaders(tmp_path):
    _, (_, yte) = write_binary(tmp_path, "cifar10", 200, 120)
    b = build({"name": "cifar10", "root": str(tmp_path)}, batch_size=32, device=CPU, seed=0, rank=1, world_size=2)
    assert (b.rank, b.world_size, b.train_size, b.test_size) == (1, 2, 200, 120)
    assert (len(b.train), len(b.test)) == (3, 2)  # global batches of 64; the second 60 test images
    assert torch.equal(collect(b.test)[1], yte[60:])


def test_cifar100_image_folder_labels_and_cache(tmp_path):
    classes = [f"class{i:03d}" for i in range(100)][::-1]  # sorted by name -> label index
    write_folder(tmp_path, classes, 2, "train")
    write_folder(tmp_path, classes, 1, "test")
    cfg = {"name": "cifar100", "root": str(tmp_path), "augment": False}
    b = build(cfg, batch_size=50, device=CPU, seed=0)
    assert (b.num_classes, b.train_size, b.test_size) == (100, 200, 100)
    raw = lambda x: torch.round(x[:, 0, 0, 0] * 0.2673 * 255 + 0.5071 * 255)  # undo normalisation
    for loader in (b.train, b.test):
        x, y = collect(loader)
        assert torch.equal(raw(x).long(), y)
    assert (tmp_path / "actmem-cache-train.pt").is_file() and (tmp_path / "actmem-cache-test.pt").is_file()

    # A changed pixel under an unchanged file list is served from the cache (so the cache is used) ...
    write_png(torch.full((3, 32, 32), 255, dtype=torch.uint8), str(tmp_path / "test" / "class000" / "0.png"))
    assert raw(next(iter(build(cfg, batch_size=50, device=CPU, seed=0).test))[0])[0] == 0
    # ... and a new file invalidates it.
    write_png(torch.zeros(3, 32, 32, dtype=torch.uint8), str(tmp_path / "test" / "class000" / "1.png"))
    b = build(cfg, batch_size=50, device=CPU, seed=0)
    assert b.test_size == 101 and raw(next(iter(b.test))[0])[0] == 255


def test_augmentation_options_reach_the_train_loader(tmp_path):
    write_binary(tmp_path, "cifar100", 200, 100)
    cfg = {"name": "cifar100", "root": str(tmp_path), "crop_padding": 0, "padding_mode": "reflect",
           "flip": "alternating"}
    b = build(cfg, batch_size=50, device=CPU, seed=0)
    assert (b.train.crop_padding, b.train.padding_mode, b.train.flip) == (0, "reflect", "alternating")
    by_content = []
    for e in (0, 1):
        b.train.set_epoch(e)
        x, _ = collect(b.train)
        by_content.append(x[torch.argsort(x.double().sum((1, 2, 3)).round(decimals=3))])  # a sum ignores mirroring
    assert torch.equal(by_content[1], by_content[0].flip(-1))  # the next epoch mirrors every image


@pytest.mark.parametrize("setting, message", [
    ({"padding_mode": "edge"}, "dataset.padding_mode='edge': use zeros or reflect"),
    ({"flip": "yes"}, "dataset.flip='yes': use random, alternating or none"),
    ({"crop_padding": -2}, "dataset.crop_padding=-2"),
])
def test_bad_augmentation_options_fail_before_loading(tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message):  # not DataNotFoundError: the root is never looked at
        build({"name": "cifar10", "root": str(tmp_path / "nowhere"), **setting}, batch_size=8, device=CPU, seed=0)


def test_reflect_padding_must_be_below_the_image_side(tmp_path):
    write_binary(tmp_path, "cifar10", 20, 10)
    cfg = {"name": "cifar10", "root": str(tmp_path), "padding_mode": "reflect"}
    with pytest.raises(ConfigError, match="dataset.crop_padding=32 .*below the image side, 32"):
        build({**cfg, "crop_padding": 32}, batch_size=8, device=CPU, seed=0)
    assert build({**cfg, "crop_padding": 31}, batch_size=8, device=CPU, seed=0).train.crop_padding == 31


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_data_names_path_and_fixes(tmp_path, name):
    root = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as e:
        build({"name": name, "root": str(root)}, batch_size=8, device=CPU, seed=0)
    msg = str(e.value)
    assert str(root) in msg and "train/<class>" in msg and SPECS[name].folder in msg
    assert "dataset.download=true" in msg and "dataset.root=" in msg
    assert ("`make data` (unpacks" in msg) == (name == "cifar10")


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(DataNotFoundError, match="could not fetch CIFAR-100.*Name or service not known"):
        build({"name": "cifar100", "root": str(tmp_path), "download": True}, batch_size=8, device=CPU, seed=0)


def test_wrong_class_count_and_unreadable_images(tmp_path):
    write_folder(tmp_path / "a", ["x", "y", "z"], 1, "train")
    write_folder(tmp_path / "a", ["x", "y", "z"], 1, "test")
    with pytest.raises(ActmemError, match="holds 3 classes, but CIFAR-10 has 10"):
        build({"name": "cifar10", "root": str(tmp_path / "a")}, batch_size=1, device=CPU, seed=0)
    classes = [str(i) for i in range(10)]
    write_folder(tmp_path / "b", classes, 1, "train")
    write_folder(tmp_path / "b", classes, 1, "test")
    bad = tmp_path / "b" / "train" / "3" / "0.png"
    bad.write_bytes(bad.read_bytes()[:-100])  # PIL's error names no file
    with pytest.raises(DataNotFoundError) as e:
        build({"name": "cifar10", "root": str(tmp_path / "b")}, batch_size=1, device=CPU, seed=0)
    assert str(e.value).startswith(f"Could not read the image {bad} (image file is truncated)")
    assert "Re-extract it" in str(e.value)


def unlink_class_9(split):
    """Class 9's folder becomes a second path to class 0's: its ten images under two labels."""
    shutil.rmtree(split / "9")
    (split / "9").symlink_to(split / "0")


def empty_class_9(split):
    for f in (split / "9").iterdir():
        f.unlink()


@pytest.mark.parametrize("spoil, message", [
    (unlink_class_9, "{split}/9 and {split}/0 are one folder"),
    (empty_class_9, "The class folder {split}/9 holds no images (files ending in .jpg, .jpeg, .png)"),
])
def test_class_folders_that_would_train_on_a_wrong_set_are_refused(tmp_path, spoil, message):
    classes = [str(i) for i in range(10)]
    write_folder(tmp_path, classes, 2, "train")
    write_folder(tmp_path, classes, 1, "test")
    spoil(tmp_path / "train")
    with pytest.raises(DataNotFoundError) as e:
        build({"name": "cifar10", "root": str(tmp_path)}, batch_size=1, device=CPU, seed=0)
    assert message.format(split=tmp_path / "train") in str(e.value)


class Py2Pickler(pickle._Pickler):
    """Writes as Python 2's cPickle wrote CIFAR's files: bytes as str opcodes, numpy 1's module names."""

    def save_bytes(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def py2_pickle(obj) -> bytes:
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


class RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("crafted", ["data_batch_3", "batches.meta"])
def test_binary_pickles_hold_data_not_code(tmp_path, crafted):
    """What CIFAR's files hold unpickles as before; a file that names a function is refused, uncalled."""
    _, (xte, yte) = write_binary(tmp_path, "cifar10", 50, 20)
    folder = tmp_path / SPECS["cifar10"].folder
    for f in folder.iterdir():  # each file as the original (Python 2, numpy 1) one is
        original = py2_pickle(pickle.loads(f.read_bytes()))
        assert b"numpy.core.multiarray" in original or f.name == "batches.meta"
        f.write_bytes(original)
    b = build({"name": "cifar10", "root": str(tmp_path)}, batch_size=10, device=CPU, seed=0)
    assert torch.equal(b.test.images, xte) and torch.equal(b.test.labels, yte)

    marker = tmp_path / "ran"
    (folder / crafted).write_bytes(pickle.dumps({"data": RunsACommand(f"touch {marker}"), "labels": []}))
    with pytest.raises(DataNotFoundError) as e:
        build({"name": "cifar10", "root": str(tmp_path)}, batch_size=10, device=CPU, seed=0)
    assert not marker.exists()
    assert str(e.value).startswith(f"Could not load {folder / crafted} as a CIFAR pickle (UnpicklingError: it "
                                   f"names {os.system.__module__}.system, which no CIFAR file holds)")
    assert "dataset.download=true" in str(e.value)


@pytest.mark.parametrize("signame", ["INT", "TERM"])
def test_a_job_stopped_while_decoding_stops_in_the_runner_alone(signame, stopped_job):
    """Decoding workers inherited the runner's handlers: each printed a traceback when the job was stopped."""
    job = stopped_job("""
        import time
        from actmem.data import cifar

        def slow(paths):  # decode_chunk's stand-in, in a worker: the one chunk stops the job
            stop_the_job()
            time.sleep(2)  # a chunk in flight is finished after Ctrl-C (SIGTERM ends the worker at once)

        cifar.decode_chunk = slow
        try:
            cifar.decode_files(["a.png"] * 4)
        except Stopped as e:
            print("stopped by", e)
    """, signame)
    assert (job.returncode, job.stdout) == (0, f"stopped by {getattr(signal, 'SIG' + signame).value}\n"), job.stderr
    assert "Traceback" not in job.stderr, job.stderr


@pytest.mark.timeout(120)
def test_decoding_pool_survives_a_busy_parent(tmp_path):
    """Forked decoders once deadlocked in the parent's OpenMP pool; warm that pool first."""
    write_folder(tmp_path, ["a", "b"], 40, "train")
    a = torch.randn(512, 512)
    (a @ a).add_(1).sum()
    paths = sorted(str(p) for p in (tmp_path / "train").glob("*/*.png"))
    x = decode_files(paths, chunk=8)
    assert x.shape == (80, 3, 32, 32) and torch.equal(x[:40, 0], torch.zeros(40, 32, 32, dtype=torch.uint8))


@pytest.fixture(scope="module")
def cifar10(cifar10_root):
    return build({"name": "cifar10", "root": str(cifar10_root)}, batch_size=256, device=CPU, seed=0)


def test_real_cifar10_loads(cifar10, cifar10_root):
    b = cifar10
    assert (b.num_classes, b.image_shape, b.train_size, b.test_size) == (10, (3, 32, 32), 50_000, 10_000)
    assert (len(b.train), len(b.test)) == (195, 40)
    cache = torch.load(cifar10_root / "actmem-cache-test.pt", weights_only=True)
    assert cache["classes"][0] == "airplane" and cache["classes"][-1] == "truck"
    x, y = next(iter(b.test))  # unaugmented, in order: the cached pixels, normalised
    torch.testing.assert_close(x, Normalize(SPECS["cifar10"].mean, SPECS["cifar10"].std, CPU)(cache["images"][:256]))
    assert torch.equal(y, cache["labels"][:256])
    x, y = next(iter(b.train))
    assert x.shape == (256, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.min() >= 0 and y.max() <= 9 and len(y.unique()) == 10
    assert abs(x.mean().item()) < 0.3 and abs(x.std().item() - 1) < 0.3  # the published mean/std fit


def test_real_cifar10_augmentation_changes_train_batches(cifar10):
    b = cifar10
    plain = type(b.train)(b.train.images, b.train.labels, 256, b.train.normalize, train=True, augment=False)
    b.train.set_epoch(2)
    plain.set_epoch(2)
    (xa, ya), (xp, yp) = next(iter(b.train)), next(iter(plain))
    assert torch.equal(ya, yp)
    changed = (xa != xp).flatten(1).any(1).float().mean()
    assert changed > 0.9  # all but the ~1/162 centred unflipped draws


def test_real_cifar10_subsets_are_balanced_and_seed_independent(cifar10_root):
    cfg = {"name": "cifar10", "root": str(cifar10_root), "train_subset": 1000, "test_subset": 500}
    a = build(cfg, batch_size=100, device=CPU, seed=0)
    b = build(cfg, batch_size=100, device=CPU, seed=1)
    assert (a.train_size, a.test_size, len(a.train), len(a.test)) == (1000, 500, 10, 5)
    assert torch.bincount(a.train.labels).tolist() == [100] * 10
    assert torch.bincount(a.test.labels).tolist() == [50] * 10
    assert torch.equal(a.train.images, b.train.images)  # the subset does not move with the run seed
    assert not torch.equal(next(iter(a.train))[1], next(iter(b.train))[1])  # the order does
