"""Real datasets for the data tests: the repo's data/ when `make data` made it, else the shared tarballs
unpacked once per session into a temporary folder (by the same code `make data` runs)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("ACTMEM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def prepare_data():
    """scripts/prepare_data.py as a module."""
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _dataset(prepare_data, tmp_path_factory, folder: str) -> Path:
    tb = next(t for t in prepare_data.TARBALLS if t.folder == folder)
    local = REPO / "data" / folder
    if local.is_dir() and prepare_data.matches(local, tb):
        return local
    if not (SHARED / tb.file).is_file():
        pytest.skip(f"{SHARED / tb.file} is not on this machine and `make data` has not made {local}")
    dest = tmp_path_factory.mktemp("shared-data") / folder
    prepare_data.unpack(SHARED / tb.file, dest, tb)
    return dest


@pytest.fixture(scope="session")
def cifar10_root(prepare_data, tmp_path_factory) -> Path:
    return _dataset(prepare_data, tmp_path_factory, "cifar10")


@pytest.fixture(scope="session")
def imagenette_root(prepare_data, tmp_path_factory) -> Path:
    return _dataset(prepare_data, tmp_path_factory, "imagenette")
