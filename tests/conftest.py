"""Fixtures shared by the whole suite: where the repo, the shared data and the real datasets are."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter. Triton reads this when a kernel is defined,
# so it is set here, before any test module imports actmem's kernels (TRITON_INTERPRET=0 overrides).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from helpers import REPO, SHARED_DATA

from actmem.data import prepare


def _real_dataset(folder: str, tmp_path_factory) -> Path:
    """`data/<folder>` as `make data` leaves it, else its shared tarball unpacked once for this session (by
    the code `make data` runs). Neither: the test fails, never skips -- `make test` runs `make data` first,
    so a missing dataset is a broken setup, and a skip would hide the tests that need it."""
    tb = next(t for t in prepare.TARBALLS if t.folder == folder)
    local, archive = REPO / "data" / folder, SHARED_DATA / tb.file
    if local.is_dir() and prepare.matches(local, tb):
        return local
    if not archive.is_file():
        found = (f"holds {prepare.count_images(local)} images, not {tb.counts}" if local.is_dir()
                 else "does not exist")
        pytest.fail(f"The {folder} dataset is missing: {local} {found}, and there is no {archive} to unpack. "
                    f"Run `make data` (it prepares {local} from {archive}; `make test` runs it first).",
                    pytrace=False)
    dest = tmp_path_factory.mktemp("shared-data") / folder
    prepare.unpack(archive, dest, tb)
    return dest


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    return _real_dataset("cifar10", tmp_path_factory)


@pytest.fixture(scope="session")
def imagenette_root(tmp_path_factory) -> Path:
    return _real_dataset("imagenette", tmp_path_factory)


@pytest.fixture(autouse=True)
def _codec_backend_left_alone():
    """A test that leaves ACTMEM_BACKEND or TRITON_INTERPRET changed puts every later test of the session on
    another codec path (the Triton interpreter: many times slower): fail it."""
    keys = ("ACTMEM_BACKEND", "TRITON_INTERPRET")
    before = {k: os.environ.get(k) for k in keys}
    yield
    after = {k: os.environ.get(k) for k in keys}
    assert after == before, f"the test changed the codec environment: {before} -> {after}"
