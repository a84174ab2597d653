"""Real datasets for the data tests: the repo's data/ when `make data` made it, else the shared tarballs
unpacked once per session into a temporary folder (by the same code `make data` runs)."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO, SHARED_DATA

from actmem.data import prepare


def _dataset(tmp_path_factory, folder: str) -> Path:
    tb = next(t for t in prepare.TARBALLS if t.folder == folder)
    local = REPO / "data" / folder
    if local.is_dir() and prepare.matches(local, tb):
        return local
    if not (SHARED_DATA / tb.file).is_file():
        pytest.skip(f"{SHARED_DATA / tb.file} is not on this machine and `make data` has not made {local}")
    dest = tmp_path_factory.mktemp("shared-data") / folder
    prepare.unpack(SHARED_DATA / tb.file, dest, tb)
    return dest


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    return _dataset(tmp_path_factory, "cifar10")


@pytest.fixture(scope="session")
def imagenette_root(tmp_path_factory) -> Path:
    return _dataset(tmp_path_factory, "imagenette")
