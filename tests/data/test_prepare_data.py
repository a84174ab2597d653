"""actmem.data.prepare (`make data`, scripts/prepare_data.py) on small tarballs in the shared data's layout."""
import dataclasses
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from helpers import REPO
from PIL import Image

from actmem.data import cifar, prepare

CLASSES = [f"c{i}" for i in range(10)]


def make_tarball(path, splits):
    src = path.parent / (path.name + ".src")
    shutil.rmtree(src, ignore_errors=True)
    for split, n in splits.items():
        for c in CLASSES[:n]:
            (src / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(src / split / c / "0.jpg")
    with tarfile.open(path, "w:gz") as tar:
        for split in splits:
            tar.add(src / split, arcname=split)


@pytest.fixture
def small(monkeypatch, tmp_path):
    """The CIFAR-10 entry expecting 10 train + 10 test images, and a shared folder that has that tarball
    but no Imagenette."""
    cifar, imagenette = prepare.TARBALLS
    monkeypatch.setattr(prepare, "TARBALLS",
                        (dataclasses.replace(cifar, counts={"train": 10, "test": 10}), imagenette))
    shared = tmp_path / "shared"
    shared.mkdir()
    make_tarball(shared / cifar.file, {"train": 10, "test": 10})
    return shared, tmp_path / "data"


def test_unpacks_builds_cache_and_is_idempotent(small, capsys):
    shared, dest = small
    prepare.prepare_all(shared, dest)
    out = capsys.readouterr().out
    assert (dest / "cifar10" / "train" / "c3" / "0.jpg").is_file()
    assert all((dest / "cifar10" / f"actmem-cache-{s}.pt").is_file() for s in ("train", "test"))
    assert "unpacked cifar10-jpg.tar.gz" in out
    assert "imagenette-160.tar.gz not found" in out and "fast.ai" in out  # missing: how to get it, no error
    assert "image-net.org" in out and "CIFAR100" in out
    assert not (dest / "imagenette").exists() and not (dest / "cifar10.partial").exists()

    mtime = (dest / "cifar10" / "actmem-cache-train.pt").stat().st_mtime_ns
    prepare.prepare_all(shared, dest)
    assert "already unpacked" in capsys.readouterr().out
    assert (dest / "cifar10" / "actmem-cache-train.pt").stat().st_mtime_ns == mtime


def test_incomplete_folder_or_damaged_tarball_fail(small):
    shared, dest = small
    (dest / "cifar10" / "train").mkdir(parents=True)
    with pytest.raises(SystemExit, match="remove it and run `make data` again"):
        prepare.prepare_all(shared, dest)
    (dest / "cifar10" / "train").rmdir()
    (dest / "cifar10").rmdir()
    make_tarball(shared / "cifar10-jpg.tar.gz", {"train": 9, "test": 10})
    with pytest.raises(SystemExit, match="looks damaged"):
        prepare.prepare_all(shared, dest)
    assert not (dest / "cifar10").exists()


# scripts/prepare_data.py with torchvision's CIFAR10 replaced: "offline" fails as urllib does without
# network, "online" leaves a tiny CIFAR-10 in torchvision's binary format (and its archive) where the real
# one would. Nothing is downloaded.
FAKE_TORCHVISION = """
import pickle, runpy, sys, urllib.error
import numpy as np
import torchvision.datasets

MODE = sys.argv.pop(1)


class FakeCIFAR10:
    filename = "cifar-10-python.tar.gz"

    def __init__(self, root, train=True, download=False):
        if MODE == "offline":
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        if MODE != "online":
            raise AssertionError("torchvision was asked for CIFAR-10 again: " + MODE)
        from pathlib import Path
        folder = Path(root) / "cifar-10-batches-py"
        folder.mkdir()
        (Path(root) / self.filename).write_bytes(b"the archive")
        rng = np.random.default_rng(0)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            blob = {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10))}
            (folder / name).write_bytes(pickle.dumps(blob))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


torchvision.datasets.CIFAR10 = FakeCIFAR10
sys.argv = ["scripts/prepare_data.py", *sys.argv[1:]]
runpy.run_path("scripts/prepare_data.py", run_name="__main__")
"""


def prepare_data(mode, shared, dest):
    """`make data SHARED=<shared>` as the Makefile runs it, torchvision's download faked as `mode`."""
    return subprocess.run([sys.executable, "-c", FAKE_TORCHVISION, mode, "--shared", str(shared), "--dest",
                           str(dest)], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_no_shared_data_and_no_network_fails_with_one_paragraph(tmp_path):
    """Outside this workplace (no ../shared/data) and offline: a non-zero exit and one paragraph that says
    what to do, not a silent success that leaves `make run` to fail inside training; nothing left behind."""
    res = prepare_data("offline", tmp_path / "none", tmp_path / "data")
    assert res.returncode != 0, res.stdout + res.stderr
    err = res.stderr.strip()
    assert "\n\n" not in err and "Traceback" not in err, err  # one paragraph
    words = " ".join(err.split())
    assert words.startswith("make data: no CIFAR-10, which `make run` and `make test` train on."), words
    assert f"{tmp_path / 'none' / 'cifar10-jpg.tar.gz'} is not there" in words
    assert "URLError" in words and "Temporary failure in name resolution" in words
    assert "make data SHARED=<folder holding cifar10-jpg.tar.gz>" in words and "where there is network" in words
    assert "fetching CIFAR-10 with torchvision" in res.stdout
    assert not (tmp_path / "data" / "cifar10").exists() and not (tmp_path / "data" / "cifar10.partial").exists()


def test_no_shared_data_fetches_cifar10_with_torchvision(tmp_path):
    """With network: CIFAR-10 in torchvision's binary format in data/cifar10 (its archive deleted once
    unpacked), readable by actmem's reader; a second run leaves it alone and fetches nothing."""
    shared, dest = tmp_path / "none", tmp_path / "data"
    res = prepare_data("online", shared, dest)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{dest / 'cifar10'}: fetched CIFAR-10 in torchvision's binary format" in res.stdout
    assert "imagenette-160.tar.gz not found" in res.stdout  # the rest as before: how to get it, no error
    assert (dest / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
    assert not (dest / "cifar10" / "cifar-10-python.tar.gz").exists() and not (dest / "cifar10.partial").exists()
    (train, _), (test, _), classes = cifar.load("cifar10", dest / "cifar10", allow_download=False)
    assert (len(train), len(test), len(classes)) == (50, 10, 10)

    again = prepare_data("must-not-be-called", shared, dest)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already holds CIFAR-10 in torchvision's binary format, skipped." in again.stdout


def test_shared_tarball_is_used_without_asking_torchvision(small, monkeypatch, capsys):
    """With ../shared/data's tarball (this workplace) `make data` unpacks it as before and never downloads."""
    shared, dest = small

    def no_download(*args, **kwargs):
        raise AssertionError("torchvision was asked to download")

    monkeypatch.setattr(prepare, "fetch", no_download)
    prepare.prepare_all(shared, dest)
    assert "unpacked cifar10-jpg.tar.gz" in capsys.readouterr().out


def test_real_tarballs_hold_the_readme_counts(cifar10_root, imagenette_root):
    """The session fixtures unpack the shared tarballs with this code (or reuse `make data`'s folders)."""
    cifar, imagenette = prepare.TARBALLS
    assert prepare.matches(cifar10_root, cifar) and prepare.matches(imagenette_root, imagenette)
    assert sorted(p.name for p in (cifar10_root / "train").iterdir())[:2] == ["airplane", "automobile"]
