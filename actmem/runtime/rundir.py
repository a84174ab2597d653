"""The run directory (docs/contracts.md: run directory) and its one owner.

`RunDirectory` alone writes summary.json, metrics.jsonl and checkpoint.pt, and decides what a restart in
a used directory may do: resume the same run (only RESUMABLE settings may differ), leave a completed run
as it is, or refuse another run's directory before anything in it is touched. A checkpoint is written
atomically at every epoch end with the one before kept, so a killed run loses at most one epoch and a
truncated checkpoint falls back to the previous one. Checkpoints hold tensors and plain numbers only and
are read with torch.load(weights_only=True): a file that needs anything else is refused, never unpickled
(an unpickled file can run code). One live process owns a directory: it holds an advisory lock on
`run.lock` (released by the kernel when the process dies), so a second start is refused and a summary left
"running" by a process that is gone reads as killed. `CheckRunDir` is the Hydra callback that refuses,
in one paragraph, an output directory that cannot be created, before Hydra tries to.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import pickle
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from actmem.core.errors import ConfigError, paragraph
from actmem.core.provenance import git_commit, versions
from actmem.runtime.loggers import LOGGERS, EpochsOnly, Logger

SUMMARY, METRICS = "summary.json", "metrics.jsonl"
CHECKPOINT, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"
LOCK = "run.lock"
# What a restart may change: the length of the run (the schedule is then laid out for the new length from
# the step reached), and how it reports or where it runs. Anything else makes it another run.
RESUMABLE = ("trainer.epochs", "trainer.max_steps", "trainer.progress", "trainer.device", "trainer.threads",
             "trainer.checkpoint_every",
             "trainer.measure_activations", "trainer.warmup_steps", "logger.", "debug")
LENGTH = ("epochs", "max_steps")


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


@dataclass
class Progress:
    """The running figures a checkpoint keeps and the summary shows."""

    best_test_acc: float | None = None
    test_acc: float | None = None
    train_loss: float | None = None


@dataclass
class ResumeState:
    """Where a run (re)starts: epochs completed, optimizer steps taken, the running figures, what an
    unfinished epoch had summed on this rank (engine.EpochSums' fields; None at an epoch's end), and this
    rank's codec states (ActNN L3's statistics; None: none saved)."""

    epoch: int = 0
    step: int = 0
    progress: Progress = field(default_factory=Progress)
    in_epoch: dict | None = None
    codecs: list | None = None


class RunDirectory:
    """One run's directory. Construct it first: it takes the directory's lock, reads what the directory
    already holds and raises ConfigError if that is another run, a live process's, or a checkpoint this
    start cannot resume (unreadable, unsafe, or written by another number of ranks) -- all before anything
    in it changes. What it logs besides epoch records is the logger's choice (actmem.runtime.loggers). With
    writes=False (the ranks of a data-parallel run other than rank 0) it reads but writes nothing:
    summary, metrics and checkpoint are rank 0's."""

    def __init__(self, path: Path, cfg: DictConfig, writes: bool = True, world_size: int = 1):
        self.path = Path(path)
        self.cfg = cfg
        self.writes = writes
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.lock = _take_lock(self.path) if writes else None
        try:
            self.previous = self._previous_summary()
            self.killed = bool(self.previous and self.previous.get("status") == "running")
            self.checkpoint = None if self.finished else self._readable_checkpoint()
            if self.checkpoint is not None:
                _check_world_size(self.path, self.checkpoint, world_size)
        except BaseException:
            self.release()
            raise
        self.summary: dict = {}
        self.logger = None

    @property
    def finished(self) -> bool:
        """It holds this run, completed at the length asked for now: a restart has nothing to do."""
        old = self.previous
        return bool(old and old.get("status") == "completed" and old.get("config")
                    and all(old["config"]["trainer"].get(k) == self.cfg.trainer[k] for k in LENGTH))

    @property
    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).exists()

    def release(self) -> None:
        """Give up the directory (the process's exit does it too)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    # ---------------------------------------------------------------- summary.json and metrics.jsonl

    def start(self) -> None:
        """summary.json with status "running"; ConfigError where the directory cannot be written."""
        cfg = self.cfg
        if self.killed and self.writes:
            print(f"{self.path} was left 'running' by a process that ended without a word (killed, e.g. by "
                  "SIGKILL, the out-of-memory killer or a lost node)"
                  + ("; resuming from its last checkpoint." if self.checkpoint else "; it kept no checkpoint, so "
                     "this run starts over."), flush=True)
        # The logger first: where it cannot start (wandb's errors) the summary is still the old run's.
        # The other ranks of a torchrun job log nothing but keep the cadence: logged steps reduce the loss.
        self.logger = (LOGGERS.get(cfg.logger.name).fn if self.writes else
                       EpochsOnly if cfg.logger.name == "none" else Logger)(self.path, cfg.logger, self.config)
        self.summary = self._first_summary()
        try:
            self.update()
        except OSError as e:
            raise ConfigError(f"cannot write {e.filename} ({e.strerror}). Give the run a directory it can write, "
                              "e.g. hydra.run.dir=outputs/NAME.") from None

    def refuse(self, error: str) -> None:
        """A start refused for its settings: a fresh directory records why (a sweep's report lists the job);
        one that holds a run is left as it is."""
        if self.previous is None and self.writes:
            self.summary = self._first_summary()
            try:
                self.update(status="failed", error=error)
            except OSError:  # the directory cannot be written: the paragraph alone says why
                pass
        self.release()

    def _first_summary(self) -> dict:
        cfg = self.cfg
        return {
            "status": "running", "dataset": cfg.dataset.name, "model": cfg.model.name,
            "strategy": cfg.strategy.name, "strategy_config": self.config["strategy"],
            "batch_size": cfg.trainer.batch_size, "epochs": 0, "steps": 0, "seed": cfg.seed, "device": None,
            "test_acc": None, "best_test_acc": None, "train_loss": None,
            "activation_bytes": None, "activation_bytes_exact": None, "activation_ratio": None,
            "peak_tensor_bytes": None, "peak_breakdown": None, "peak_memory_bytes": None, "peak_rss_bytes": None,
            "throughput_img_s": None, "wall_time_s": None, "versions": versions(), "git_commit": git_commit(),
            "config": self.config,
        }

    def update(self, **fields) -> None:
        self.summary.update(fields)
        if self.writes:
            write_json_atomic(self.path / SUMMARY, self.summary)

    def finish(self, status: str, **fields) -> None:
        """The final summary (completed, failed or interrupted); closes the logger, gives up the lock."""
        self.update(status=status, **fields)
        if self.logger is not None:
            self.logger.finish()
            self.logger = None
        self.release()

    def wants_step(self, step: int) -> bool:
        return self.logger is not None and self.logger.log_every > 0 and step % self.logger.log_every == 0

    def log(self, record: dict) -> None:
        if not self.writes:
            return
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(strict(record), allow_nan=False) + "\n")
        if self.logger is not None:
            self.logger.mirror(record)

    # ---------------------------------------------------------------- checkpoint.pt

    def save(self, *, model, optimizer, scheduler, scaler, epoch: int, step: int, progress: dict,
             lookahead=None, in_epoch: list[dict] | None = None, ranks: list[dict] | None = None) -> None:
        """`epoch`: epochs completed; `progress`: the loop's running figures (best accuracy, ...);
        `in_epoch`: for a checkpoint inside an epoch (a mid-epoch checkpoint, or a run that stopped before
        its epoch's end), what that epoch has summed on each rank (engine.EpochSums); `ranks`: each rank's
        own state, in rank order: {"rng": rng_state(), ...} (default: this process's RNG states)."""
        if not self.writes:
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                 "lookahead": lookahead.state_dict() if lookahead else None, "epoch": epoch, "step": step,
                 "in_epoch": in_epoch, "progress": progress, "ranks": ranks or [{"rng": rng_state()}]}
        path = self.path / CHECKPOINT
        tmp = path.with_name(CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        if path.exists():
            os.replace(path, self.path / PREVIOUS)
        os.replace(tmp, path)

    def resume(self, *, model, optimizer, scheduler, scaler, lookahead=None, rank: int = 0) -> ResumeState:
        """Restore the checkpoint read at construction in place (rank `rank`'s RNG states), drop the metrics
        records past it, and bring the summary up to it; a fresh ResumeState where there is none."""
        state, self.checkpoint = self.checkpoint, None
        if state is None:
            return ResumeState()
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        if lookahead and state.get("lookahead"):
            lookahead.load_state_dict(state["lookahead"])
        mine = state["ranks"][rank]
        _set_rng_state(mine["rng"])
        if self.writes:
            print(f"Resuming from {self.path / CHECKPOINT}: {state['epoch']} epoch(s), {state['step']} step(s) "
                  "done.", flush=True)
            self._drop_records_after(state["step"], mid_epoch=state.get("in_epoch") is not None)
        self.update(epochs=state["epoch"], steps=state["step"], **state["progress"])
        return ResumeState(state["epoch"], state["step"], Progress(**state["progress"]),
                           state["in_epoch"][rank] if state.get("in_epoch") else None, mine.get("codecs"))

    def _drop_records_after(self, step: int, mid_epoch: bool) -> None:
        """metrics.jsonl without the records the resumed run writes again: those of later steps, the
        test-time-augmented evaluation, and, for a checkpoint inside an epoch, that epoch's end records
        (a run stopped by trainer.max_steps evaluated its unfinished epoch): a step or an epoch must not
        appear twice."""
        path = self.path / METRICS
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines(keepends=True) if _kept(line, step, mid_epoch)]
        tmp = path.with_name(METRICS + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)

    # ---------------------------------------------------------------- what the directory already holds

    def _previous_summary(self) -> dict | None:
        """The summary of the run this directory holds (None if none), after checking that this start's
        config is that run's up to RESUMABLE keys."""
        path = self.path / SUMMARY
        if not path.exists():
            return None
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:  # a damaged file, or a path that is not a file
            raise ConfigError(f"{path} is unreadable ({e}), so it is unknown which run {self.path} holds. Start "
                              f"this run in a fresh directory, or delete {self.path} to discard what it holds."
                              ) from None
        if old.get("config") is None:  # written before summaries kept their config
            return old
        # compared as written: the summary holds strict JSON
        before, now = _flat(old["config"]), _flat(strict(self.config))
        changed = sorted(k for k in before.keys() | now.keys()
                         if before.get(k) != now.get(k) and not k.startswith(RESUMABLE))
        if changed:
            shown = "; ".join(f"{k}={before.get(k)!r} there, {now.get(k)!r} now" for k in changed[:6])
            raise ConfigError(f"{self.path} holds another run ({old.get('status')}, {old.get('epochs')} epoch(s)): "
                              f"it was started with other settings ({shown}). A run directory holds one run; only "
                              f"{', '.join(k.rstrip('.') for k in RESUMABLE)} may change on a restart. Start this "
                              "run in a fresh directory (leave hydra.run.dir unset, or give another), or delete "
                              f"{self.path} to discard the old run.")
        return old

    def _readable_checkpoint(self) -> dict | None:
        """The latest checkpoint, on the CPU, or the one before where the latest cannot be read (truncated
        by a full disk, say); ConfigError where neither can, or where one needs more than the safe loader
        admits."""
        path = self.path / CHECKPOINT
        if not path.exists():
            return None
        errors = []
        for candidate in (path, self.path / PREVIOUS):
            if not candidate.exists():
                continue
            try:
                state = torch.load(candidate, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                if "Unsupported global" in str(e):  # a well-formed file asking for objects: refused, not damaged
                    raise ConfigError(_unsafe_message(candidate, e)) from None
                errors.append(f"{candidate.name}: {type(e).__name__}")
                continue
            except Exception as e:  # torch.load raises zip, EOF and Runtime errors for a damaged file
                errors.append(f"{candidate.name}: {type(e).__name__}")
                continue
            if candidate != path:
                print(f"{path} is unreadable ({errors[0]}); resuming from the checkpoint before it, {candidate}.",
                      flush=True)
            return state
        raise ConfigError(f"{path} is unreadable ({'; '.join(errors)}) and no earlier checkpoint can be read, so "
                          f"the run in {self.path} cannot resume. Delete {self.path} (or start in a fresh "
                          "directory) to train from the start.")


def _unsafe_message(path: Path, error: Exception) -> str:
    why = next(line.strip() for line in str(error).splitlines() if "Unsupported global" in line)
    return (f"{path} was not loaded: it holds more than tensors and plain numbers ({why}), and reading it would "
            "mean unpickling arbitrary objects, which can run code. actmem writes its checkpoints for PyTorch's "
            "safe loader (torch.load(weights_only=True)), so this file was written by something else (or by an "
            "actmem from before 2026-12-08). Start this run in a fresh directory, or delete the checkpoint files "
            f"in {path.parent} to train from the start.")


def _check_world_size(path: Path, state: dict, world_size: int) -> None:
    saved = len(state["ranks"])
    if saved != world_size:
        raise ConfigError(f"{path} holds a run trained with {saved} process(es) (torchrun's --nproc_per_node); "
                          f"this start has {world_size}. The global batch would change: resume with {saved}, or "
                          "start this run in a fresh directory.")


def _take_lock(path: Path):
    """The directory's lock file, locked by this process (the open file keeps it); ConfigError naming the
    live owner where another process holds it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK, "a+")
    except OSError as e:
        raise ConfigError(f"cannot write {e.filename} ({e.strerror}). Give the run a directory it can write, "
                          "e.g. hydra.run.dir=outputs/NAME.") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"{path} is in use: {owner} is running in it now, and a run directory is written by one "
                          "process. Wait for it to end (or stop it: the run resumes from its checkpoint when "
                          "started again), or start this run in another directory.") from None
    except OSError:  # a file system without locks (some network mounts): go on without one
        pass
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})")
    handle.flush()
    return handle


def owner_alive(path: Path) -> bool | None:
    """Whether a live process holds `path`'s lock (None where that cannot be told: a file system without
    locks). A summary "running" with no live owner is a run that was killed."""
    try:
        with open(Path(path) / LOCK) as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
    except FileNotFoundError:  # no process ever locked it
        return False
    except BlockingIOError:
        return True
    except OSError:
        return None


class CheckRunDir(Callback):
    """Hydra creates the output directory itself and, where it cannot, stops with a traceback; this
    callback (configs/config.yaml, hydra.callbacks) creates it first and says in one paragraph what to do."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _make_dir(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _make_dir(config.hydra.sweep.dir, "hydra.sweep.dir")


def _make_dir(path: str, key: str) -> None:
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", path)
    except OSError as e:
        print(paragraph(f"Error: {key}={path} cannot be used as an output directory: {e.filename or path}: "
                        f"{e.strerror}. Give {key} a path where a directory can be created and written, e.g. "
                        f"{key}=outputs/NAME."), file=sys.stderr)
        sys.exit(2)


def _kept(line: str, step: int, mid_epoch: bool) -> bool:
    """Whether a metrics record stays when resuming at `step` (see _drop_records_after); a line a killed run
    left half written goes."""
    try:
        record = json.loads(line)
        at = record["step"]
    except (ValueError, KeyError, TypeError):
        return False
    step_record = record.get("split") == "train" and record.get("acc") is None
    return at < step or (at == step and "tta" not in record and (step_record or not mid_epoch))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def rng_state() -> dict:
    """This process's RNG states in types the safe loader reads (numpy's as a tensor and numbers)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
