"""The run directory's records: metrics.jsonl, summary.json (atomic), and an optional wandb mirror."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path

import torch

import actmem


def strict(obj):
    """obj with every NaN/Inf float as None: JSON has no such numbers, and a reader's json.loads must
    not fail on a diverged run's record."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(strict(obj), f, indent=2, default=str, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


class RunLog:
    """`logger=none`: epoch records only; `jsonl`: also a train record every `log_every` steps;
    `wandb`: the same records mirrored to wandb (offline unless logger.mode=online)."""

    def __init__(self, run_dir: Path, cfg, config_dict: dict):
        self.path = run_dir / "metrics.jsonl"
        self.every = cfg.log_every if cfg.name != "none" else 0
        self.wandb = None
        if cfg.name == "wandb":
            import wandb
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=cfg.project, mode=cfg.mode, dir=str(run_dir), config=config_dict,
                                    name=run_dir.name, resume="allow", id=_wandb_id(run_dir))

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(strict(record), allow_nan=False) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{record['split']}/{k}": v for k, v in record.items() if k != "split"},
                           step=record["step"])

    def wants_step(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run directory, so a resumed run continues the same wandb run."""
    import hashlib
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
