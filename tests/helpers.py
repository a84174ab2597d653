"""What several test modules share (importable because pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ACTMEM_SHARED_DATA", REPO.parent / "shared" / "data"))


def run_train(*overrides: str, run_dir: Path, timeout: float = 600, env: dict | None = None):
    """`python -m actmem.train` in a subprocess, its run directory pinned to `run_dir`."""
    assert (REPO / "configs" / "config.yaml").is_file(), f"not a checkout of actmem: {REPO}"
    cmd = [sys.executable, "-m", "actmem.train", f"hydra.run.dir={run_dir}", "trainer.progress=false", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
