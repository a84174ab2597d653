"""What produced a record: the code's commit and the library versions, written into every summary.json
and results file so a figure read later still says where it came from."""
from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
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


def command_line() -> str:
    """This process's command, as typed to run it again."""
    return shlex.join(["python", *sys.argv])


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's model, cores and torch threads (what a throughput figure depends on)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"GPU ({torch.cuda.get_device_name(device)})"
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    name = names[0] if names else platform.processor() or platform.machine()
    return f"CPU, {os.cpu_count()} cores ({name}), {torch.get_num_threads()} torch threads"


def header(command: str, device: str, started: dt.datetime, extra: dict | None = None) -> str:
    """The bullet lines that head a results file: command, commit, date, device, versions, then `extra`'s
    items. Call it before the work starts: the commit is read now, and the code may change meanwhile."""
    items = {"command": f"`{command}`", "commit": git_commit() or "unknown",
             "date": started.astimezone().isoformat(timespec="seconds"), "device": device,
             "versions": ", ".join(f"{k} {v}" for k, v in versions().items() if v), **(extra or {})}
    return "".join(f"- {k}: {v}\n" for k, v in items.items())
