"""The parity protocol (issue 15): every strategy x N seeds on experiment=airbench94, in one process, then
the table of test accuracy (mean ± std), difference to exact (± standard error), activation ratio and
throughput against exact (actmem.experiments.parity).

    python scripts/parity.py --seeds 5
    python scripts/parity.py --seeds 3 --only "exact,actnn L3,division" --budget 600
    python scripts/parity.py --seeds 2 --out outputs/parity-cpu -- trainer.device=cpu dataset.train_subset=2000

Hydra overrides after `--` are added to experiment=airbench94. Each run gets a directory under --out
(default outputs/parity/<date>_<time>); --out/parity.md holds the command, commit, date, device and
versions, the table, and every run's row, rewritten after each run. Started again with the same --out, the
runs already completed there are read, not trained again. Exit status 1 when a run failed, 2 on bad
arguments.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

from hydra.errors import HydraException

from actmem.core import provenance
from actmem.core.config import positive_seconds
from actmem.core.errors import ActmemError
from actmem.experiments.parity import ProtocolRun, compose_config, run_protocol, runs_table, select, summarize, table
from actmem.runtime.setup import resolve_device

PRESET = "experiment=airbench94"


def report(head: str, protocol: ProtocolRun, labels: list[str]) -> str:
    stopped = f"\nNot every run was made: {protocol.stopped}.\n" if protocol.stopped else ""
    return (f"# Parity protocol\n\n{head}{stopped}\n{table(summarize(protocol.results, labels))}\n\n"
            f"Every run, in the order run:\n\n{runs_table(protocol.results)}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="parity.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, required=True, help="runs per strategy: seeds 0 .. N-1")
    ap.add_argument("--only", help="comma-separated strategy labels (default: all of the protocol)")
    ap.add_argument("--out", type=Path, help="where the run directories and parity.md go")
    ap.add_argument("--budget", type=float,
                    help="seconds: a run starts only if its strategy's last run fits (default: no limit)")
    ap.add_argument("overrides", nargs="*", help=f"Hydra overrides (after --), added to {PRESET}")
    args = ap.parse_args(argv)
    started = dt.datetime.now().astimezone()
    base = [PRESET, *args.overrides]
    try:
        if args.seeds < 1:
            raise ActmemError(f"--seeds {args.seeds}: give at least 1.")
        if args.budget is not None:
            positive_seconds(args.budget, "--budget")
        variants = select(args.only)
        device = provenance.device_name(resolve_device(compose_config(base).trainer.device))
    except (ActmemError, HydraException) as e:  # a bad label, override or device: refused before any run
        print(f"parity.py: {e}", file=sys.stderr)
        return 2
    out = args.out or Path("outputs/parity") / f"{started:%Y-%m-%d_%H-%M-%S}"
    out.mkdir(parents=True, exist_ok=True)
    labels = [v.label for v in variants]
    head = provenance.header(provenance.command_line(), device, started,
                             {"protocol": f"{args.seeds} seed(s) x {', '.join(labels)}, seed-major",
                              "overrides": f"`{' '.join(base)}`", "run directories": str(out)})

    def progress(protocol: ProtocolRun) -> None:
        r = protocol.results[-1]
        print(f"[parity] {r.label} seed {r.seed}: {r.status} in {r.seconds:.1f} s"
              + (f" ({r.error})" if r.error else ""), flush=True)
        (out / "parity.md").write_text(report(head, protocol, labels))

    deadline = float("inf") if args.budget is None else time.time() + args.budget
    protocol = run_protocol(variants, args.seeds, base, out, deadline=deadline, on_result=progress)
    text = report(head, protocol, labels)
    (out / "parity.md").write_text(text)
    print("\n" + text + f"\n(written to {out / 'parity.md'})")
    return 1 if any(r.status == "failed" for r in protocol.results) else 0


if __name__ == "__main__":
    sys.exit(main())
