"""checkpoint.pt: the latest training state, written atomically at every epoch end, so a killed run
loses at most one epoch and resumes where it stopped when started again in the same directory."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from actmem.errors import ConfigError

NAME = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # the one before, kept in case the latest is found unreadable
# What a restart may change: the length of the run (the schedule is then laid out for the new length from
# the step reached), and how it reports or where it runs. Anything else makes it another run.
RESUMABLE = ("trainer.epochs", "trainer.max_steps", "trainer.progress", "trainer.device", "trainer.threads",
             "trainer.measure_activations", "trainer.warmup_steps", "logger.", "debug")


def previous_run(run_dir: Path, config: dict) -> dict | None:
    """The summary of the run this directory already holds (None if it holds none), after checking that
    `config` (the resolved config of this start) is that run's, up to RESUMABLE keys; raises ConfigError
    naming the differences otherwise, before anything in the directory is touched."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:  # a damaged file, or a path that is not a file
        raise ConfigError(f"{path} is unreadable ({e}), so it is unknown which run {run_dir} holds. Start this "
                          f"run in a fresh directory, or delete {run_dir} to discard what it holds.") from None
    if old.get("config") is None:  # written before summaries kept their config
        return old
    before, now = _flat(old["config"]), _flat(config)
    changed = sorted(k for k in before.keys() | now.keys()
                     if before.get(k) != now.get(k) and not k.startswith(RESUMABLE))
    if changed:
        shown = "; ".join(f"{k}={before.get(k)!r} there, {now.get(k)!r} now" for k in changed[:6])
        raise ConfigError(f"{run_dir} holds another run ({old.get('status')}, {old.get('epochs')} epoch(s)): it "
                          f"was started with other settings ({shown}). A run directory holds one run; only "
                          f"{', '.join(k.rstrip('.') for k in RESUMABLE)} may change on a restart. Start this run "
                          f"in a fresh directory (leave hydra.run.dir unset, or give another), or delete {run_dir} "
                          "to discard the old run.")
    return old


def _readable_state(run_dir: Path, device) -> dict | None:
    """The latest checkpoint, or the one before it where the latest cannot be read (truncated by a full
    disk, say); ConfigError where neither can."""
    path = run_dir / NAME
    if not path.exists():
        return None
    errors = []
    for candidate in (path, run_dir / PREVIOUS):
        if not candidate.exists():
            continue
        try:
            state = torch.load(candidate, map_location=device, weights_only=False)
        except Exception as e:  # torch.load raises pickle, zip, EOF and Runtime errors for a damaged file
            errors.append(f"{candidate.name}: {type(e).__name__}")
            continue
        if candidate != path:
            print(f"{path} is unreadable ({errors[0]}); resuming from the checkpoint before it, {candidate}.",
                  flush=True)
        return state
    raise ConfigError(f"{path} is unreadable ({'; '.join(errors)}) and no earlier checkpoint can be read, so "
                      f"the run in {run_dir} cannot resume. Delete {run_dir} (or start in a fresh directory) to "
                      "train from the start.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, *, model, optimizer, scheduler, scaler, epoch: int, step: int, progress: dict) -> None:
    """`epoch`: epochs completed; `progress`: the loop's running figures (best accuracy, ...)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
             "epoch": epoch, "step": step, "progress": progress, "rng": _rng_state()}
    path = run_dir / NAME
    tmp = path.with_name(NAME + ".tmp")
    torch.save(state, tmp)
    if path.exists():
        os.replace(path, run_dir / PREVIOUS)
    os.replace(tmp, path)


def load(run_dir: Path, *, model, optimizer, scheduler, scaler, device) -> dict | None:
    """Restore the saved state in place; returns {epoch, step, progress} or None when starting fresh."""
    state = _readable_state(run_dir, device)
    if state is None:
        return None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return {"epoch": state["epoch"], "step": state["step"], "progress": state["progress"]}
