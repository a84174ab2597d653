"""`python -m actmem.torchrun [torchrun's options] -m actmem.train [overrides]`: PyTorch's torchrun, with a
failed job ending as any actmem run does. torchrun itself ends a job whose rank failed with its own
traceback and exit status 1; here the ranks' one-paragraph errors stand, torchrun adds one line naming the
rank that failed first, and the exit status is that rank's (2 for a refused setting, 128 + N for a
signal), so scripts and schedulers can tell the failures apart."""
from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from actmem.core.errors import paragraph


def exit_status(exitcode: int) -> int:
    """A child's exit code as a shell reports it: a process killed by signal N (exitcode -N) as 128 + N."""
    return 128 - exitcode if exitcode < 0 else exitcode or 1


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # the agent's own log lines repeat what the failed rank said, in a traceback-like block
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        status = exit_status(failure.exitcode)
        print(paragraph(f"torchrun: {e.name} failed: rank {rank} ended first, with exit status {status} "
                        "(its message is above); torchrun stopped the other ranks."), file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
