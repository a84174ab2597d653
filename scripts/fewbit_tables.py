"""Regenerate actmem/strategies/fewbit_tables.json: the optimal few-bit derivative tables.

    python scripts/fewbit_tables.py                      # the shipped tables (4200 cells on [-10, 10])
    python scripts/fewbit_tables.py --cells 400 --out /tmp/t.json --only gelu silu
    python scripts/fewbit_tables.py --weight normal:2     # w = N(0, 2²) density instead of uniform

For each continuous activation and b = 1..4: the exact DP optimum of ∫ (f' - q)² w over piecewise-constant
q with 2**b pieces and borders on the grid (actmem.strategies.fewbit.optimal_tables). About 10 s per
activation at 4200 cells on 2 CPU cores; memory grows as cells² (peak RSS 1.5 GB at 4200).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from actmem.strategies.fewbit import CONTINUOUS, TABLES_PATH, canonical, optimal_tables, uniform


def weight_fn(spec: str):
    """"uniform" or "normal:SIGMA" (the N(0, SIGMA²) density)."""
    if spec == "uniform":
        return uniform
    kind, _, sigma = spec.partition(":")
    if kind != "normal" or not sigma:
        raise SystemExit(f"--weight {spec!r}: use 'uniform' or 'normal:SIGMA', e.g. normal:2")
    s = float(sigma)
    return lambda x: torch.exp(-0.5 * (x / s) ** 2) / (s * math.sqrt(2 * math.pi))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lo", type=float, default=-10.0)
    ap.add_argument("--hi", type=float, default=10.0)
    ap.add_argument("--cells", type=int, default=4200, help="grid cells; borders lie on the grid")
    ap.add_argument("--nodes", type=int, default=8, help="Gauss-Legendre points per cell")
    ap.add_argument("--weight", default="uniform", help="uniform | normal:SIGMA")
    ap.add_argument("--max-bits", type=int, default=4)
    names = sorted(CONTINUOUS)
    ap.add_argument("--only", nargs="*", default=names, choices=names, metavar="NAME")
    ap.add_argument("--out", type=Path, default=TABLES_PATH)
    args = ap.parse_args(argv)

    weight = weight_fn(args.weight)
    tables = {}
    for name in args.only:
        t0 = time.perf_counter()
        found = optimal_tables(CONTINUOUS[name], args.max_bits, args.lo, args.hi, args.cells, weight,
                               args.nodes)
        tables[name] = {str(b): canonical(name, t) for b, t in found.items()}
        errors = "  ".join(f"b={b}: {t['error']:.3e}" for b, t in found.items())
        print(f"{name:11s} {errors}   ({time.perf_counter() - t0:.1f} s)", flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    doc = {
        "settings": {"lo": args.lo, "hi": args.hi, "cells": args.cells, "nodes": args.nodes,
                     "weight": args.weight, "max_bits": args.max_bits},
        "generated_by": {"command": "python " + shlex.join(["scripts/fewbit_tables.py", *sys.argv[1:]]),
                         "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                         "git_commit": commit, "torch": torch.__version__},
        "tables": tables,
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
