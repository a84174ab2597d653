"""What produced a record: the code's commit and the library versions, written into every summary.json
and results file so a figure read later still says where it came from."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

import actmem


def git_commit() -> str | None:
    """HEAD's hash, with "-dirty" when tracked files differ from it (the run's code is not that commit).
    Where there is no repository (a copied working tree, as on a lent GPU machine), ACTMEM_GIT_COMMIT if
    the caller set it, else None."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"],
                             capture_output=True, text=True, timeout=10, cwd=Path(actmem.__file__).parent)
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or os.environ.get("ACTMEM_GIT_COMMIT")


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "actmem": actmem.__version__}
