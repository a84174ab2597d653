"""Fixtures shared by the whole suite: where the repo, the shared data and the real datasets are."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter. Triton reads this when a kernel is defined,
# so it is set here, before any test module imports actmem's kernels (TRITON_INTERPRET=0 overrides).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from helpers import REPO, SHARED_DATA


def _real_dataset(name: str, tarball: str, tmp_path_factory) -> Path:
    """`data/<name>` as `make data` leaves it, else the shared tarball unpacked once for this session."""
    prepared = REPO / "data" / name
    if (prepared / "train").is_dir():
        return prepared
    archive = SHARED_DATA / tarball
    if not archive.exists():
        pytest.fail(f"{name}: neither {prepared} (run `make data`) nor {archive} exists")
    dest = tmp_path_factory.mktemp(name)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    return _real_dataset("cifar10", "cifar10-jpg.tar.gz", tmp_path_factory)


@pytest.fixture(scope="session")
def imagenette_root(tmp_path_factory) -> Path:
    return _real_dataset("imagenette", "imagenette-160.tar.gz", tmp_path_factory)
