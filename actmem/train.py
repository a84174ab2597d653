"""Entry point: `python -m actmem.train [hydra overrides]` (docs/contracts.md: command line and run
directory). The run itself is actmem.runtime: lifecycle (start, end, how it ended) and session (its
phases); this module maps how a run ended to what the shell sees."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from actmem.core.config import CONFIG_DIR
from actmem.core.errors import ActmemError, paragraph
from actmem.runtime.distributed import World
from actmem.runtime.lifecycle import Interrupted, execute, listen_for_signals, open_run
from actmem.runtime.setup import register_hydra, resolve_device

register_hydra()


class JobFailed(CompactHydraException):
    """A failed job of a sweep (-m): raised instead of exiting, so that the launcher goes on with the other
    jobs and Hydra ends the sweep non-zero with this message (no traceback)."""


def _fail(status: int, message: str) -> NoReturn:
    """Print `message`; exit with `status`, or in a sweep raise JobFailed so that the other jobs still run."""
    print(message, file=sys.stderr)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise JobFailed(f"{message} (exit status {status})")
    sys.exit(status)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        opened = open_run(cfg, run_dir, lambda cfg: World.setup(resolve_device(cfg.trainer.device)))
    except ActmemError as e:
        _fail(2, paragraph(f"Error: {e}"))
    if opened is None:
        return
    directory, world = opened
    listen_for_signals()
    ending = execute(cfg, directory, world)
    if ending is None:
        return
    if isinstance(ending.error, Interrupted):  # stops a sweep too: the user or the scheduler said so
        if ending.message:
            print(ending.message, file=sys.stderr)
        sys.exit(ending.status)
    if cfg.debug:
        raise ending.error
    if ending.message is None:
        sys.exit(ending.status)
    _fail(ending.status, ending.message)


if __name__ == "__main__":
    # hydra/launcher=submitit_* pickles main: taken from __main__ it would go by value with every global it
    # reaches (torch.backends.cudnn cannot be pickled); from the importable module it goes by name.
    from actmem.train import main as importable_main

    importable_main()
