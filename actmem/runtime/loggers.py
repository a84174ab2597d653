"""Loggers (the `logger=` group): what a run records besides its epoch records in metrics.jsonl.
`none`: epoch records only; `jsonl`: also a train record every `logger.log_every` steps; `wandb`: the
same records mirrored to wandb (offline unless logger.mode=online)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from actmem.core.errors import ConfigError
from actmem.core.registry import Registry

LOGGERS = Registry("logger")
WANDB_MODES = ("offline", "online", "disabled")  # wandb.init's modes


class Logger:
    """Base: logs step records every `log_every` steps (0: never) and mirrors each record nowhere."""

    def __init__(self, run_dir: Path, cfg, config: dict):
        self.log_every = cfg.log_every

    def mirror(self, record: dict) -> None:
        pass

    def finish(self) -> None:
        pass


@LOGGERS.register("none")
class EpochsOnly(Logger):
    def __init__(self, run_dir: Path, cfg, config: dict):
        self.log_every = 0


LOGGERS.register("jsonl")(Logger)


@LOGGERS.register("wandb")
class Wandb(Logger):
    def __init__(self, run_dir: Path, cfg, config: dict):
        import wandb

        super().__init__(run_dir, cfg, config)
        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]  # a resumed run continues it
        try:
            self.run = wandb.init(project=cfg.project, mode=cfg.mode, dir=str(run_dir), config=config,
                                  name=run_dir.name, resume="allow", id=run_id)
        except Exception as e:  # wandb's own errors (login, project name, service) stop the run before training
            raise ConfigError(f"logger=wandb could not start ({type(e).__name__}: {e}). Check logger.project and "
                              f"logger.mode (one of {', '.join(WANDB_MODES)}; online needs `wandb login`), or "
                              "use logger=jsonl.") from None

    def mirror(self, record: dict) -> None:
        self.run.log({f"{record['split']}/{k}": v for k, v in record.items() if k != "split"}, step=record["step"])

    def finish(self) -> None:
        self.run.finish()
