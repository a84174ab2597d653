"""checkpoint.pt: the latest training state, written atomically at every epoch end, so a killed run
loses at most one epoch and resumes where it stopped when started again in the same directory."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

NAME = "checkpoint.pt"


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
    os.replace(tmp, path)


def load(run_dir: Path, *, model, optimizer, scheduler, scaler, device) -> dict | None:
    """Restore the saved state in place; returns {epoch, step, progress} or None when starting fresh."""
    path = run_dir / NAME
    if not path.exists():
        return None
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return {"epoch": state["epoch"], "step": state["step"], "progress": state["progress"]}
