"""A job with the runner's signal handlers to stop. (The real datasets, cifar10_root and imagenette_root, are
tests/conftest.py's, for the whole suite: a missing dataset fails there, it is never skipped here.)"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from helpers import REPO

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
