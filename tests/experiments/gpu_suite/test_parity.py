"""The suite's parity section: its dry run end to end (as on the GPU, in its own process under the runner),
and CIFAR-10 unpacked from the GPU bundle, or a missing tarball named with the fix."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from helpers import REPO
from PIL import Image

from actmem.core.errors import DataNotFoundError
from actmem.data.prepare import Tarball
from actmem.experiments.gpu_suite import accuracy as section
from actmem.experiments.parity import PROTOCOL


def test_dry_run_trains_every_strategy_for_two_seeds(tmp_path):
    res = subprocess.run([sys.executable, "scripts/gpu_suite.py", "--dry-run", "--only", "parity", "--out",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    text = (tmp_path / "gpu-parity.md").read_text()
    assert "n = 2 seed(s) per strategy (all 2 seed(s) asked for ran)." in text, text
    for v in PROTOCOL:
        if v.label == "blpa":  # airbench94 is a GELU network: blpa's BN -> ReLU -> Conv chains are not there
            assert "| blpa | 0 | - | - | - | - | - | n/a: blpa found no BatchNorm2d -> ReLU -> Conv2d chain" in text
        else:
            assert f"| {v.label} | 2 | " in text, text
    assert "| exact | 2 | " in text and "| reference | 1.00 |" in text
    assert text.count("| completed |") == 2 * (len(PROTOCOL) - 1)


def _tiny_cifar_tarball(path, per_split: int) -> None:
    """train/ and test/ with one 32x32 JPEG in each of `per_split` class folders, laid out as
    cifar10-jpg.tar.gz is."""
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for c in range(per_split):
                buf = io.BytesIO()
                Image.fromarray(np.full((32, 32, 3), 25 * c, np.uint8)).save(buf, format="JPEG")
                info = tarfile.TarInfo(f"{split}/class{c}/0.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)


def test_cifar10_is_unpacked_from_the_bundle_and_its_cache_built(tmp_path, monkeypatch):
    monkeypatch.setattr(section, "CIFAR10", Tarball("cifar10-jpg.tar.gz", "cifar10", {"train": 10, "test": 10}, ""))
    bundle, dest = tmp_path / "bundle", tmp_path / "data"
    bundle.mkdir()
    _tiny_cifar_tarball(bundle / "cifar10-jpg.tar.gz", 10)
    line = section.prepare_cifar10(bundle, dest)
    assert line.startswith(f"CIFAR-10: unpacked from {bundle / 'cifar10-jpg.tar.gz'} into {dest / 'cifar10'}")
    assert (dest / "cifar10" / "test" / "class9" / "0.jpg").is_file()
    assert (dest / "cifar10" / "actmem-cache-train.pt").is_file()
    assert section.prepare_cifar10(bundle, dest) == f"CIFAR-10: {dest / 'cifar10'}, already there."


def test_missing_tarball_says_how_to_bundle_it(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        section.prepare_cifar10(tmp_path / "bundle", tmp_path / "data")
    message = str(e.value)
    assert f"{tmp_path / 'data' / 'cifar10'} does not exist" in message
    assert "make gpu-bundle" in message and "carry `.gpu`" in message
