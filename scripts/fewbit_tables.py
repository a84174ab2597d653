"""Regenerate the shipped few-bit derivative tables, or write the report that compares them.

    python scripts/fewbit_tables.py                    # both shipped sets (about 2.5 minutes on 2 cores)
    python scripts/fewbit_tables.py --report results/fewbit-tables.md   # their errors, and the official ones
    python scripts/fewbit_tables.py --objective uniform100 --growth 1.004 --out /tmp/t.json  # finer tails
    python scripts/fewbit_tables.py --objective uniform10 --cells 400 --out /tmp/t.json --only gelu silu
    python scripts/fewbit_tables.py --objective uniform10 --weight normal:2 --out /tmp/t.json  # w: N(0, 2²)

For each continuous activation and b = 1..4: the exact DP optimum of ∫_-R^R (f' - q)² w over piecewise-constant
q with 2**b pieces and borders on the grid (actmem.strategies.fewbit.optimal_tables on objective_grid), w
uniform unless --weight says otherwise. Objective uniform10 (R = 10; the default tables, fewbit_tables.json):
4200 cells, about 4 s per activation, peak RSS 1.5 GB; uniform100 (R = 100, the official table generator's
domain; fewbit_tables_uniform100.json): the same 4200 cells on [-10, 10] plus 2 x 528 tail cells, about 7 s,
peak RSS 2.1 GB (memory grows as cells²).

--report evaluates the shipped tables, and the official ones that could be read (OFFICIAL below), under three
weights, each as E (f'(x) - q(x))² for x drawn from it (actmem.strategies.fewbit.mean_square_error).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from actmem.strategies.fewbit import (
    BITS,
    CONTINUOUS,
    OBJECTIVES,
    TABLES,
    canonical,
    derivative_table,
    mean_square_error,
    objective_grid,
    optimal_tables,
    uniform,
)

REPO = Path(__file__).resolve().parent.parent

# The official tables that could be read as text, from skolai/fewbit. Its shipped file, fewbit/data/builtin.npz,
# is binary and could not be read here, so every other activation and width has no official column.
# - GELU, 3 bits: fewbit/approx_test.py (commit c3a1cdb), the table its search (fewbit/approx.py) is tested to
#   find on (-100, 100), to 0.1 in borders and 0.01 in levels; the same numbers are the BOUNDS/LEVELS of the
#   repository's early GELU module.
# - Hardswish, 1-4 bits: the rule of tools/quantize-hardswish.py (commit 6b34728), the tool that made them:
#   1 bit: border 0, levels 0.005 and 1; b bits: 2**b - 1 borders evenly spaced on [-3, 3], levels 0 and 1
#   outside, f' at the middle of each piece between.
OFFICIAL_GELU3 = ([-2.39798704e+00, -7.11248159e-01, -3.26290283e-01, -1.55338428e-04,
                   3.26182064e-01, 7.10855860e-01, 2.39811567e+00],
                  [-0.00260009, -0.08883533, 0.1251944, 0.37204148, 0.6277958, 0.87466175, 1.08880716, 1.00259936])


def official(name: str, bits: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if name == "gelu" and bits == 3:
        return tuple(torch.tensor(v, dtype=torch.float64) for v in OFFICIAL_GELU3)
    if name != "hardswish":
        return None
    if bits == 1:
        return torch.tensor([0.0], dtype=torch.float64), torch.tensor([0.005, 1.0], dtype=torch.float64)
    borders = torch.linspace(-3, 3, 2**bits - 1, dtype=torch.float64)
    middle = (borders[1:] + borders[:-1]) / 2 / 3 + 0.5  # hardswish' = x/3 + 1/2 on (-3, 3)
    return borders, torch.cat([middle.new_zeros(1), middle, middle.new_ones(1)])


def weight_fn(spec: str):
    """"uniform" or "normal:SIGMA" (the N(0, SIGMA²) density)."""
    if spec == "uniform":
        return uniform
    kind, _, sigma = spec.partition(":")
    if kind != "normal" or not sigma:
        raise SystemExit(f"--weight {spec!r}: use 'uniform' or 'normal:SIGMA', e.g. normal:2")
    s = float(sigma)
    return lambda x: torch.exp(-0.5 * (x / s) ** 2) / (s * math.sqrt(2 * math.pi))


def commit() -> str:
    """HEAD's short hash, and whether the working tree differs from it (in which few-bit files, if any)."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO).stdout  # noqa: E731
    head = git("rev-parse", "--short", "HEAD").strip()
    if not git("status", "--porcelain").strip():
        return head
    ours = git("status", "--porcelain", "--", "actmem/strategies/fewbit*", "scripts/fewbit_tables.py").splitlines()
    return head + ", working tree dirty" + (f" (uncommitted: {', '.join(line[3:] for line in ours)})" if ours
                                            else " (none of the few-bit files)")


def command() -> str:
    return "python " + shlex.join(["scripts/fewbit_tables.py", *sys.argv[1:]])


def generate(args) -> None:
    if args.out and len(args.objective) > 1:
        raise SystemExit("--out takes one --objective")
    weight = weight_fn(args.weight)
    for objective in args.objective:
        reach = OBJECTIVES[objective]
        edges = objective_grid(reach, args.cells, args.growth)
        tables = {}
        for name in args.only:
            t0 = time.perf_counter()
            found = optimal_tables(CONTINUOUS[name], edges, args.max_bits, weight, args.nodes)
            tables[name] = {str(b): canonical(name, t) for b, t in found.items()}
            errors = "  ".join(f"b={b}: {t['error']:.3e}" for b, t in found.items())
            print(f"{objective} {name:11s} {errors}   ({time.perf_counter() - t0:.1f} s)", flush=True)
        doc = {
            "settings": {"objective": objective, "lo": -reach, "hi": reach, "cells": args.cells,
                         "growth": args.growth, "nodes": args.nodes, "weight": args.weight, "max_bits": args.max_bits},
            "generated_by": {"command": command(),
                             "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                             "git_commit": commit(), "torch": torch.__version__},
            "tables": tables,
        }
        out = args.out or TABLES[objective]
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}")


# Report column groups: heading -> (R of the grid on [-R, R], weight). The normal weight's mass beyond +-10 is 2e-23.
WEIGHTS = {"U[-10, 10]": (10.0, uniform), "U[-100, 100]": (100.0, uniform), "N(0, 1)": (10.0, weight_fn("normal:1"))}


def report(path: Path, names: list[str]) -> None:
    t0, started = time.perf_counter(), datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    sets = {**{o: partial(derivative_table, objective=o) for o in OBJECTIVES}, "official": official}
    errors = {}  # (weight, set, name, bits) -> error
    for heading, (reach, weight) in WEIGHTS.items():
        edges = objective_grid(reach)
        for label, table in sets.items():
            for name in names:
                for bits in BITS:
                    t = table(name, bits)
                    if t is not None:
                        errors[heading, label, name, bits] = mean_square_error(CONTINUOUS[name], *t, edges, weight)

    cell = lambda *key: f"{errors[key]:.3e}" if key in errors else "–"  # noqa: E731
    groups = " | ".join(f"{h}: ours u10 | ours u100 | official" for h in WEIGHTS)
    rows = [f"| activation | b | {groups} |", "|---|---|" + "---:|" * 3 * len(WEIGHTS)]
    for name in names:
        for bits in BITS:
            rows.append(f"| {name} | {bits} | " + " | ".join(cell(h, s, name, bits) for h in WEIGHTS for s in sets)
                        + " |")

    def ratios(heading, num, den):
        r = [errors[heading, num, n, b] / errors[heading, den, n, b] for n in names for b in BITS
             if (heading, num, n, b) in errors]
        return f"{min(r):.3g}–{max(r):.3g} (median {statistics.median(r):.3g}, {len(r)} tables)"

    gelu = lambda x: float(CONTINUOUS["gelu"](torch.tensor(x, dtype=torch.float64)))  # noqa: E731
    borders, levels = (t.tolist() for t in official("gelu", 3))
    b, c = borders[0], borders[-1]
    means = {r: f"{(gelu(b) - gelu(-r)) / (b + r):.4g} and {(gelu(r) - gelu(c)) / (r - c):.4g}" for r in (10.0, 100.0)}
    gelu3 = (f"{errors[h, 'official', 'gelu', 3] / errors[h, s, 'gelu', 3]:.4g} times that of ours {short} under {h}"
             for h, s, short in (("U[-10, 10]", "uniform10", "u10"), ("U[-100, 100]", "uniform100", "u100"))
             if "gelu" in names)
    path.write_text(f"""# Few-bit derivative tables: error of each table set under three weights

- command: `{command()}`
- commit: {commit()}
- date: {started}; took {time.perf_counter() - t0:.0f} s
- device: CPU ({platform.machine()}, {torch.get_num_threads()} torch threads); torch {torch.__version__}

Each number is E (f'(x) - q(x))² for x drawn from the column group's weight, q the table as shipped (its
levels are not refitted): ∫ (f' - q)² w / ∫ w, integrated exactly for a piecewise-constant q (Gauss-Legendre,
8 points per cell of `objective_grid`, with the table's own borders added as cell edges;
`actmem.strategies.fewbit.mean_square_error`). U[-10, 10] and U[-100, 100] are the two objectives
(`strategy.objective=uniform10`, the default, and `uniform100`, the official generator's domain); N(0, 1) is a
standard normal weight, for which neither set is fitted.

- ours u10: `actmem/strategies/fewbit_tables.json`, the DP optimum for U[-10, 10].
- ours u100: `actmem/strategies/fewbit_tables_uniform100.json`, the DP optimum for U[-100, 100].
- official: skolai/fewbit's tables where they could be read as text: GELU 3 bits from `fewbit/approx_test.py`,
  Hardswish by the rule of `tools/quantize-hardswish.py` (see OFFICIAL in scripts/fewbit_tables.py). Their
  shipped file `fewbit/data/builtin.npz` is binary and could not be read, so the other cells are "–".

Each of our sets has the smaller error under its own objective (tests/strategies/test_fewbit.py checks it):
under U[-10, 10], ours u100 has {ratios("U[-10, 10]", "uniform100", "uniform10")} times the error of ours u10;
under U[-100, 100], ours u10 has {ratios("U[-100, 100]", "uniform10", "uniform100")} times that of ours u100.
Under N(0, 1), ours u100 has {ratios("N(0, 1)", "uniform100", "uniform10")} times the error of ours u10.

The official 3-bit GELU table is fitted to U[-10, 10], not U[-100, 100]: its outer levels
{levels[0]:.4g} and {levels[-1]:.4g} are the means of f' over [-10, {b:.4g}] and [{c:.4g}, 10] ({means[10.0]}), not
over [-100, {b:.4g}] and [{c:.4g}, 100] ({means[100.0]}). Its error is {"; ".join(gelu3)}. It is below
ours under U[-10, 10] by our grid resolution only: our borders lie on multiples of 1/210, its borders do not.

{chr(10).join(rows)}
""")
    print(f"wrote {path}")


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
    if args.report:
        report(args.report, args.only)
    else:
        generate(args)


if __name__ == "__main__":
    main()
