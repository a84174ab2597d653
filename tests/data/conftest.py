"""Real datasets for the data tests: the repo's data/ when `make data` made it, else the shared tarballs
unpacked once per session into a temporary folder (by the same code `make data` runs); and a job with the
runner's signal handlers to stop."""
from __future__ import annotations

import subprocess
import sys
import textwrap
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


RUNNER = """
import os, signal, subprocess, sys, threading

class Stopped(BaseException):  # what actmem.train's handlers raise: no `except Exception` catches it
    pass

def stop(signum, frame):
    raise Stopped(signum)

for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, stop)

def stop_the_job(after=0.0):
    # What a terminal's Ctrl-C or a scheduler does: signal every process of the job, from outside it.
    kill = ["kill", "-s", sys.argv[1], "--", f"-{os.getpgrp()}"]
    threading.Timer(after, subprocess.run, (kill,)).start()
"""


@pytest.fixture
def stopped_job():
    """run(body, signal name, *args): `body` as a script after signal handlers like the runner's, in a
    session of its own (the job's process group), with stop_the_job() to send it that signal."""

    def run(body: str, signame: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", RUNNER + textwrap.dedent(body), signame, *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120, start_new_session=True)

    return run
