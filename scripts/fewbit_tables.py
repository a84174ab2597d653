"""Regenerate the shipped few-bit derivative tables, or write the report that compares them.

    python scripts/fewbit_tables.py                    # both shipped sets (about 2.5 minutes on 2 cores)
    python scripts/fewbit_tables.py --report results/fewbit-tables.md   # their errors, and the official ones
    python scripts/fewbit_tables.py --objective uniform100 --growth 1.004 --out /tmp/t.json  # finer tails
    python scripts/fewbit_tables.py --objective uniform10 --cells 400 --out /tmp/t.json --only gelu silu
    python scripts/fewbit_tables.py --objective uniform10 --weight normal:2 --out /tmp/t.json  # w: N(0, 2²)

For each continuous activation and b = 1..4: the exact DP optimum of ∫_-R^R (f' - q)² w over piecewise-constant
q with 2**b pieces and borders on the grid (actmem.strategies.fewbit_solver), w uniform unless --weight says otherwise.
Objective uniform10 (R = 10; the default tables, fewbit_tables.json): 4200 cells, about 4 s per activation, peak
RSS 1.5 GB; uniform100 (R = 100, the official table generator's domain; fewbit_tables_uniform100.json): the
same 4200 cells on [-10, 10] plus 2 x 528 tail cells, about 7 s, peak RSS 2.1 GB (memory grows as cells²).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from actmem.strategies.fewbit import CONTINUOUS, OBJECTIVES, TABLES
from actmem.strategies.fewbit_solver import make_tables, weight_fn, write_report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Objectives: w uniform on [-R, R]: "
                                        + ", ".join(f"{k}: R={v:g}" for k, v in OBJECTIVES.items()))
    ap.add_argument("--objective", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES),
                    help="which table sets to make (default: all, each into its shipped file)")
    ap.add_argument("--cells", type=int, default=4200, help="grid cells on [-10, 10]; borders lie on the grid")
    ap.add_argument("--growth", type=float, default=1.01, help="growth of the grid cells beyond +-10")
    ap.add_argument("--nodes", type=int, default=8, help="Gauss-Legendre points per cell")
    ap.add_argument("--weight", default="uniform", help="uniform | normal:SIGMA")
    ap.add_argument("--max-bits", type=int, default=4)
    names = sorted(CONTINUOUS)
    ap.add_argument("--only", nargs="*", default=names, choices=names, metavar="NAME")
    ap.add_argument("--out", type=Path, help="write here instead of the shipped file (one --objective)")
    ap.add_argument("--report", type=Path, metavar="MD", help="write the error report of the shipped tables")
    args = ap.parse_args(argv)
    try:
        weight_fn(args.weight)
    except ValueError as e:
        ap.error(str(e))
    if args.out and len(args.objective) > 1:
        ap.error("--out takes one --objective")
    if args.report:
        write_report(args.report, args.only)
        print(f"wrote {args.report}")
        return
    for objective in args.objective:
        doc = make_tables(objective, args.only, args.cells, args.growth, args.nodes, args.weight, args.max_bits)
        out = args.out or TABLES[objective]
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
