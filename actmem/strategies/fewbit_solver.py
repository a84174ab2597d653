"""The offline solver behind few-bit backward's tables (actmem.strategies.fewbit): for an activation f,
the piecewise-constant q with 2**b pieces minimising ∫ (f'(x) - q(x))² w(x) dx, exactly, by dynamic
programming over borders on a grid. scripts/fewbit_tables.py runs it once; the strategy only reads the
shipped tables. `make_tables` makes one shipped file's content, `write_report` the comparison of the
shipped sets (and the official tables that could be read) in results/fewbit-tables.md."""
from __future__ import annotations

import datetime as dt
import math
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from actmem.core.provenance import command_line, device_name, git_commit, header
from actmem.strategies.fewbit import BITS, CONTINUOUS, OBJECTIVES, SYMMETRY, derivative_table


def derivative(fn, x: torch.Tensor) -> torch.Tensor:
    """f'(x) by torch's own backward of the op, so a table fits exactly the derivative autograd uses."""
    x = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    return grad


def uniform(x: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(x)


def grid(lo: float, hi: float, cells: int) -> torch.Tensor:
    """cells + 1 float64 edges; written as mid + half * k / cells so that a grid symmetric about 0 is
    exactly symmetric (mirrored borders come out as exact negatives)."""
    k = 2 * torch.arange(cells + 1, dtype=torch.float64) - cells
    return (lo + hi) / 2 + (hi - lo) / 2 * k / cells


def objective_grid(reach: float, cells: int = 4200, growth: float = 1.01) -> torch.Tensor:
    """The edges the DP's borders lie on, for w uniform on [-reach, reach]: `cells` equal cells on
    [-10, 10] (the shipped step 1/210 puts the kinks at 0 and +-3 and the 3/7-wide steps of the optimal
    Hardswish table on the grid), then, out to +-reach, cells that grow by `growth` each from that step
    (the last one cut at reach); exactly symmetric. reach=100 takes 2 x 528 tail cells instead of 2 x 18900
    at step 1/210 (the DP's memory grows as cells²). Coarse tails cost little: beyond +-10 every
    tabulated f' is within 5e-4 of a constant (its limit), except softsign's 1/(1 + |x|)², which is below
    0.0083 and smooth; there a border resolves to 1/210 + 1% of its distance past 10. No shipped
    uniform100 border lies in the tails, and tails 2.5x finer (growth 1.004) give the same borders for
    every table, levels and errors within 1e-10."""
    if reach <= 10.0:
        return grid(-reach, reach, cells)
    step = 20.0 / cells
    n = math.ceil(math.log1p((reach - 10.0) * (growth - 1) / step) / math.log(growth))
    tail = 10.0 + step * (growth ** torch.arange(1, n + 1, dtype=torch.float64) - 1) / (growth - 1)
    tail = torch.cat([tail[tail < reach], torch.tensor([reach], dtype=torch.float64)])
    return torch.cat([-tail.flip(0), grid(-10.0, 10.0, cells), tail])


def quadrature(edges: torch.Tensor, weight=uniform, nodes: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """[cells, nodes] Gauss-Legendre points x of every cell and their weights times w(x)."""
    t, tw = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(nodes))
    a, b = edges[:-1, None], edges[1:, None]
    x = (a + b) / 2 + (b - a) / 2 * t
    return x, (b - a) / 2 * tw * weight(x)


def cell_moments(fn, edges: torch.Tensor, weight=uniform, nodes: int = 8) -> torch.Tensor:
    """[3, cells + 1] prefix sums of ∫w, ∫f'w, ∫f'²w over the grid cells (Gauss-Legendre, `nodes`
    points per cell; kinks of f' sit on grid points, so each cell's integrand is smooth)."""
    x, h = quadrature(edges, weight, nodes)
    d = derivative(fn, x)
    cells = torch.stack([h.sum(1), (h * d).sum(1), (h * d * d).sum(1)])
    return F.pad(cells.cumsum(1), (1, 0))


def interval_costs(moments: torch.Tensor) -> torch.Tensor:
    """[n, n] with entry (i, j) = min over constants c of ∫ (f' - c)² w on edges i..j (inf unless i < j)
    = ∫f'²w - (∫f'w)² / ∫w, from prefix sums in O(1) each. Memory: O(cells²)."""
    w, a, b = (m[None, :] - m[:, None] for m in moments)
    n = moments.shape[1]
    above = torch.ones(n, n, dtype=torch.bool).triu(1)
    return torch.where(above, b - a.square() / torch.where(above, w, 1.0), math.inf)


def optimal_tables(fn, edges: torch.Tensor, max_bits: int = 4, weight=uniform, nodes: int = 8) -> dict[int, dict]:
    """For b = 1..max_bits, the piecewise-constant q with 2**b pieces, borders among `edges`, that
    minimises ∫ (f' - q)² w over [edges[0], edges[-1]] exactly: DP over the number of pieces, D_k[j] =
    min_i D_{k-1}[i] + cost(i, j), vectorised over i and j. One DP of 2**max_bits steps serves every b.
    Exact over the grid, so the optimum over all borders up to the grid's resolution.

    Returns {b: {"borders": 2**b - 1 floats, "levels": 2**b floats (w-weighted mean of f' over each
    interval), "error": the minimum, unnormalised}}; the outer intervals extend to +-inf when the table
    is used."""
    cells = len(edges) - 1
    moments = cell_moments(fn, edges, weight, nodes)
    cost = interval_costs(moments)
    best = torch.full((cells + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    back = []
    for _ in range(2**max_bits):
        best, arg = (best[:, None] + cost).min(0)
        back.append(arg)
    tables = {}
    for bits in range(1, max_bits + 1):
        points = [cells]
        for step in reversed(back[: 2**bits]):
            points.append(int(step[points[-1]]))
        idx = torch.tensor(points[::-1])
        w, a, b = (m[idx[1:]] - m[idx[:-1]] for m in moments)
        tables[bits] = {"borders": edges[idx[1:-1]].tolist(), "levels": (a / w).tolist(),
                        "error": float((b - a.square() / w).sum())}
    return tables


def mean_square_error(fn, borders: torch.Tensor, levels: torch.Tensor, edges: torch.Tensor, weight=uniform,
                      nodes: int = 8) -> float:
    """E (f'(x) - q(x))² for x with density ∝ w on [edges[0], edges[-1]], q the table as given (levels not
    refitted): the table's borders join the quadrature's edges, so each cell's integrand is smooth and
    any table is integrated as accurately as the DP's own moments."""
    inside = borders[(borders > edges[0]) & (borders < edges[-1])]
    x, h = quadrature(torch.cat([edges, inside]).unique(), weight, nodes)
    q = levels[torch.bucketize(x, borders)]
    return float((h * (derivative(fn, x) - q).square()).sum() / h.sum())


def mirror(table: dict, symmetry: str) -> dict:
    """The table of x -> q(-x) (for "odd" symmetry: 1 - q(-x)), which has the same error."""
    levels = table["levels"][::-1]
    return {**table, "borders": [-b for b in table["borders"][::-1]],
            "levels": [1 - v for v in levels] if symmetry == "odd" else levels}


def canonical(name: str, table: dict) -> dict:
    """Of an even derivative's two mirror-image optima, the one whose borders sum to <= 0."""
    if SYMMETRY.get(name) == "even" and sum(table["borders"]) > 0:
        return mirror(table, "even")
    return table


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
        raise ValueError(f"weight {spec!r}: use 'uniform' or 'normal:SIGMA', e.g. normal:2")
    s = float(sigma)
    return lambda x: torch.exp(-0.5 * (x / s) ** 2) / (s * math.sqrt(2 * math.pi))


def make_tables(objective: str, names: list[str], cells: int = 4200, growth: float = 1.01, nodes: int = 8,
                weight: str = "uniform", max_bits: int = 4) -> dict:
    """The document of one shipped tables file: the DP optimum for every activation in `names`, with the
    settings and the provenance that made it."""
    started, reach = dt.datetime.now(), OBJECTIVES[objective]
    edges, w = objective_grid(reach, cells, growth), weight_fn(weight)
    tables = {}
    for name in names:
        t0 = time.perf_counter()
        found = optimal_tables(CONTINUOUS[name], edges, max_bits, w, nodes)
        tables[name] = {str(b): canonical(name, t) for b, t in found.items()}
        errors = "  ".join(f"b={b}: {t['error']:.3e}" for b, t in found.items())
        print(f"{objective} {name:11s} {errors}   ({time.perf_counter() - t0:.1f} s)", flush=True)
    return {"settings": {"objective": objective, "lo": -reach, "hi": reach, "cells": cells, "growth": growth,
                         "nodes": nodes, "weight": weight, "max_bits": max_bits},
            "generated_by": {"command": command_line(), "date": started.astimezone().isoformat(timespec="seconds"),
                             "git_commit": git_commit(), "torch": torch.__version__},
            "tables": tables}


# Report column groups: heading -> (R of the grid on [-R, R], weight). The normal weight's mass beyond +-10 is 2e-23.
WEIGHTS = {"U[-10, 10]": (10.0, uniform), "U[-100, 100]": (100.0, uniform), "N(0, 1)": (10.0, weight_fn("normal:1"))}


def table_errors(sets: dict, names: list[str]) -> dict:
    """(weight heading, set label, activation, bits) -> the table's mean square error under that weight."""
    errors = {}
    for heading, (reach, weight) in WEIGHTS.items():
        edges = objective_grid(reach)
        for label, table in sets.items():
            for name in names:
                for bits in BITS:
                    t = table(name, bits)
                    if t is not None:
                        errors[heading, label, name, bits] = mean_square_error(CONTINUOUS[name], *t, edges, weight)
    return errors


def write_report(path: Path, names: list[str]) -> None:
    """results/fewbit-tables.md: every table set's error under every weight of WEIGHTS."""
    t0, started = time.perf_counter(), dt.datetime.now()
    head = header(command_line(), device_name("cpu"), started)
    sets = {**{o: partial(derivative_table, objective=o) for o in OBJECTIVES}, "official": official}
    errors = table_errors(sets, names)

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

{head}- took: {time.perf_counter() - t0:.1f} s

Each number is E (f'(x) - q(x))² for x drawn from the column group's weight, q the table as shipped (its
levels are not refitted): ∫ (f' - q)² w / ∫ w, integrated exactly for a piecewise-constant q (Gauss-Legendre,
8 points per cell of `objective_grid`, with the table's own borders added as cell edges;
`actmem.strategies.fewbit_solver.mean_square_error`). U[-10, 10] and U[-100, 100] are the two objectives
(`strategy.objective=uniform10`, the default, and `uniform100`, the official generator's domain); N(0, 1) is a
standard normal weight, for which neither set is fitted.

- ours u10: `actmem/strategies/fewbit_tables.json`, the DP optimum for U[-10, 10].
- ours u100: `actmem/strategies/fewbit_tables_uniform100.json`, the DP optimum for U[-100, 100].
- official: skolai/fewbit's tables where they could be read as text: GELU 3 bits from `fewbit/approx_test.py`,
  Hardswish by the rule of `tools/quantize-hardswish.py` (`official` in actmem/strategies/fewbit_solver.py).
  Their shipped file `fewbit/data/builtin.npz` is binary and could not be read, so the other cells are "–".

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
