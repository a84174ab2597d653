"""Run one Hydra sweep of `python -m actmem.train` over strategies and print (and optionally save) the
report table, headed by the command, commit, date and device that produced it.

    python scripts/sweep_table.py experiment=quick_cpu                      # make run: every strategy
    python scripts/sweep_table.py --strategies exact,checkpoint --out results/cpu-baseline.md \
        experiment=quick_cpu dataset.train_subset=null trainer.epochs=3
"""
from __future__ import annotations

import argparse
import datetime as dt
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from actmem.core.provenance import command_line, device_name, header
from actmem.report import load_runs, render
from actmem.strategies import STRATEGIES

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategies", default="all",
                    help="comma-separated strategy names, or 'all' (every registered one but combo)")
    ap.add_argument("--out", type=Path, help="also write the table, with its provenance, to this markdown file")
    ap.add_argument("--append", action="store_true", help="add to --out as a new section instead of replacing it")
    ap.add_argument("--title", default="actmem comparison")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run of the sweep")
    args = ap.parse_args()
    names = [n for n in STRATEGIES.names() if n != "combo"] if args.strategies == "all" else args.strategies.split(",")
    started = dt.datetime.now()
    sweep_dir = REPO / "outputs" / "sweeps" / started.strftime("%Y-%m-%d_%H-%M-%S")
    cpu = "trainer.device=cpu" in args.overrides or not torch.cuda.is_available()
    head = header(command_line(), device_name("cpu" if cpu else "cuda"), started, {  # before the runs start
        "runs": f"under `{sweep_dir.relative_to(REPO)}`, each with its own commit in its summary.json"})
    cmd = [sys.executable, "-m", "actmem.train", "-m", *args.overrides, f"strategy={','.join(names)}",
           f"hydra.sweep.dir={sweep_dir}"]
    print("+", shlex.join(cmd[1:]), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        print(f"The sweep failed; its runs are under {sweep_dir}.", file=sys.stderr)
        return 1
    table = render(load_runs([sweep_dir]), "md")
    text = f"{'##' if args.append else '#'} {args.title}\n\n{head}\n{table}\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "a" if args.append else "w") as f:
            f.write(("\n" if args.append else "") + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
