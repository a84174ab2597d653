"""The header every suite file starts with: what produced the figures below it (GPU, driver, versions,
commit, date, command, wall time), collected once per run, so that a file read months later, or
copied off a borrowed machine, still says where it came from."""
from __future__ import annotations

import datetime as dt
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from actmem.core.provenance import git_commit

REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Provenance:
    gpu: str
    driver: str
    torch: str
    triton: str
    python: str
    commit: str
    command: str
    dry_run: bool


def collect(command: str, dry_run: bool) -> Provenance:
    gpu, driver = gpu_and_driver()
    try:
        triton = metadata.version("triton")  # no import: importing is harmless, defining kernels is not
    except metadata.PackageNotFoundError:
        triton = "not installed"
    return Provenance(gpu, driver, f"{torch.__version__} (CUDA {torch.version.cuda})", triton,
                      platform.python_version(),
                      git_commit() or "unknown (no git repository here; set ACTMEM_GIT_COMMIT)", command, dry_run)


def gpu_and_driver() -> tuple[str, str]:
    """(GPU name, driver version) from nvidia-smi, which needs no CUDA context; torch's device name and
    'unknown' where nvidia-smi is missing."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        name, driver = out.splitlines()[0].rsplit(",", 1)
        return name.strip(), driver.strip()
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        pass
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), "unknown"
    return "none", "unknown"


def header(p: Provenance, section: str, started: dt.datetime, seconds: float, limit: float) -> str:
    lines = [f"# GPU suite: {section}", ""]
    if p.dry_run:
        lines += ["**DRY RUN on CPU (Triton interpreter, toy sizes): not measurements.**", ""]
    lines += [
        f"- GPU: {p.gpu}; driver {p.driver}",
        f"- torch {p.torch}, triton {p.triton}, python {p.python}",
        f"- commit: {p.commit}",
        f"- date: {started.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC",
        f"- command: `{p.command}`",
        f"- section wall time: {seconds:.1f} s (limit {limit:.0f} s)",
        "",
    ]
    return "\n".join(lines)
