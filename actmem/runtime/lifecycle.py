"""A run's life around the training itself, shared by `python -m actmem.train` and the parity protocol:
`open_run` validates the settings and takes the run directory (refusing, before anything there changes,
another run's directory or a live process's), `execute` trains and records how the run ended (completed,
interrupted, failed, naming a torchrun peer that failed first) and says it in one paragraph."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from actmem.core.config import validate
from actmem.core.errors import ActmemError, DivergedError, paragraph
from actmem.runtime.distributed import World
from actmem.runtime.rundir import RunDirectory
from actmem.runtime.session import train


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM (what Slurm and most schedulers send at a time limit) during a run."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


def listen_for_signals() -> None:
    """SIGINT and SIGTERM end the run as Interrupted (recorded, resumable) instead of killing it."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, _interrupt)
        except ValueError:  # not the main thread (a launcher's worker): its signals stay as they were
            pass


def open_run(cfg: DictConfig, run_dir: Path, world_of) -> tuple[RunDirectory, World] | None:
    """(directory started for this run, this rank's world); None where the directory holds this run,
    completed. `world_of(cfg)` sets up the process group once the settings are valid. ActmemError where the
    start is refused; a fresh directory then records why (a sweep's report lists the job)."""
    directory = None
    try:
        validate(cfg)
        world = world_of(cfg)
        # Refuses another run's directory (or a live process's, or a checkpoint it cannot resume) before
        # touching it; under torchrun only rank 0 writes.
        directory = RunDirectory(run_dir, cfg, writes=world.main, world_size=world.size)
        if directory.finished:
            if world.main:
                print(f"{run_dir} holds this run, completed ({directory.previous.get('epochs')} epoch(s)); "
                      "nothing to do. Give more trainer.epochs to train on.")
            directory.release()
            world.close()
            return None
        directory.start()
    except ActmemError as e:
        if directory is None:
            try:
                directory = RunDirectory(run_dir, cfg, writes=int(os.environ.get("RANK", 0)) == 0)
            except ActmemError:  # another run's or a live process's directory: left as it is
                raise e from None
        directory.refuse(str(e))
        raise
    return directory, world


@dataclass
class Ending:
    """How a run that did not complete ended, already recorded in its summary: the exit status, the
    paragraph that says so (None: this rank says nothing), and the exception."""

    status: int
    message: str | None
    error: BaseException


def execute(cfg: DictConfig, directory: RunDirectory, world: World) -> Ending | None:
    """Train; None when the run completed, else its Ending (recorded in the summary)."""
    try:
        train(cfg, directory, world)
    except BaseException as e:  # noqa: B036 -- every ending is recorded: a signal, an error, a failed peer
        return _record_ending(e, directory, world)
    world.close()
    return None


def _record_ending(e: BaseException, directory: RunDirectory, world: World) -> Ending:
    where = "" if world.main else f" on rank {world.rank}"
    if isinstance(e, ActmemError):
        _stopping(world, f"{type(e).__name__}: {e}")
        directory.finish("failed", error=str(e), **({"failed_step": e.step} if isinstance(e, DivergedError) else {}))
        return Ending(2, paragraph(f"Error{where}: {e}"), e)
    signalled = isinstance(e, (Interrupted, KeyboardInterrupt))
    error = f"stopped by {e}" if signalled else f"{type(e).__name__}: {e}"
    _stopping(world, "signal" if signalled else error)
    lost = lost_ranks(world) if world.main and world.distributed else ""
    if signalled:
        signum = getattr(e, "signum", signal.SIGINT)
        if not world.main:
            return Ending(128 + signum, None, e)
        directory.finish("failed" if lost else "interrupted", error=f"{lost}; this rank {error}" if lost else error)
        return Ending(1 if lost else 128 + signum, _interrupted_message(directory, lost, str(e)), e)
    directory.finish("failed", error=f"{lost}; here {error}" if lost else error)
    kept = (f"The run directory {directory.path} keeps its last checkpoint" if directory.has_checkpoint
            else f"No checkpoint was written yet, so {directory.path} holds none")
    return Ending(1, paragraph(f"Run failed{where}: {lost + '; here ' if lost else ''}{error}. {kept}; run again "
                               "with debug=true for the traceback."), e)


def _interrupted_message(directory: RunDirectory, lost: str, signal_name: str) -> str:
    done = f"{directory.summary['epochs']} epoch(s), {directory.summary['steps']} step(s) done"
    resume = (f"{directory.path} keeps its last checkpoint ({done}); run the same command with "
              f"hydra.run.dir={directory.path} to resume from it." if directory.has_checkpoint else
              "There is no checkpoint to resume from yet; run the command again to start over.")
    return paragraph(f"{'Failed: ' + lost if lost else 'Interrupted by ' + signal_name}. {resume}")


def _stopping(world: World, why: str) -> None:
    """A rank of a torchrun job that stops: further SIGINT/SIGTERM ignored (torchrun's, after the peer's
    death this rank is reporting, must not cut the report short), and `why` left for rank 0 in torchrun's
    store. A single process (the parity protocol runs many runs in one) keeps its signals."""
    if not world.distributed:
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
    world.record_stop(why)


def lost_ranks(world: World) -> str:
    """On rank 0 of a torchrun job that stopped: which other ranks failed or died first, in words ("" if
    none did: the whole job was stopped, by a scheduler or Ctrl-C)."""
    parts = []
    for rank, why in world.peers_status().items():
        if why is None:
            parts.append(f"rank {rank} stopped without a word (killed, e.g. by SIGKILL or the out-of-memory "
                         "killer)")
        elif why != "signal":
            parts.append(f"rank {rank} failed ({why})")
    return "; ".join(parts) + ("; torchrun then stopped the other ranks" if parts else "")
