"""Few-bit backward (Novikov et al., arXiv 2202.00441; official code skolai/fewbit).

An element-wise activation f keeps for backward only a b-bit code per element: the interval of x among
2**b - 1 inner borders. Backward is `levels[code] * grad_out`. The (borders, levels) pair is the
piecewise-constant q with 2**b pieces that minimises  ∫ (f'(x) - q(x))² w(x) dx  for the weight w that
`strategy.objective` names:
- uniform10 (default): w uniform on [-10, 10], the official DP notebook's formulation
  (notebooks/few-bit-backward/custom_gelu_dynamic_programming.py);
- uniform100: w uniform on [-100, 100], the domain of the official package's table generator
  (fewbit/cli.py). The tails then weigh more, so the outer pieces fit them better and the middle ones
  worse; results/fewbit-tables.md gives both sets' errors under both weights and under a standard
  normal one.
Each set is the exact optimum over borders on a grid (`objective_grid`: step 1/210 on [-10, 10], cells
growing 1% each beyond), found by dynamic programming (`optimal_tables`). Tables are computed once by
scripts/fewbit_tables.py, shipped in fewbit_tables.json (uniform10) and fewbit_tables_uniform100.json,
and read by `derivative_table`. ReLU, LeakyReLU, ReLU6, Hardtanh and Hardsigmoid have piecewise-constant
derivatives: they get exact 1- or 2-bit tables (`exact_table`), so their gradients are exact whatever
the objective.

Deviations from the official code:
- The official package makes its tables by a local search (fewbit/approx.py) that its CLI runs with w
  uniform on [-100, 100] (fewbit/cli.py); its Hardswish tables space the borders evenly on [-3, 3]
  (tools/quantize-hardswish.py), at 2 bits about twice our error. Ours are the DP optimum up to grid
  resolution, by default for w uniform on [-10, 10]. The shipped official tables (fewbit/data/builtin.npz)
  could not be read; the one official table we could read, GELU at 3 bits (fewbit/approx_test.py), is
  the optimum for [-10, 10] (its borders are off our 1/210 grid, its error 0.01% below ours).
  results/fewbit-tables.md has the numbers.
- Tables cover GELU with approximate="tanh" too (its own f'), not only the erf GELU.
- Derivatives that are even (tanh, sigmoid, softsign) have two mirror-image optima and no symmetric
  one (a symmetric table with an even number of pieces wastes a border at 0); we ship the optimum
  whose borders sum to <= 0. Derivatives with f'(x) + f'(-x) = 1 (GELU, SiLU, Softplus, Hardswish,
  LogSigmoid) have a unique, symmetric optimum.
- The forward is the replaced module's own op, bit for bit (the official GELU has its own kernel); an
  in-place activation (torchvision's EfficientNet SiLU) runs out of place: same values.
- Stepwise activations use their exact width (1 or 2 bits) whatever `bits` says; continuous ones
  have tables for their default parameters only (ELU/CELU alpha=1, Softplus beta=1 threshold=20),
  other settings are refused at apply time.
- Only activation modules are replaced; activations called as functions (F.relu) stay exact.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from actmem.compress.index import bucketize_pack, lookup_mul
from actmem.errors import ConfigError, StrategyError
from actmem.strategies.base import STRATEGIES, Claimed, replace_modules

BITS = (1, 2, 3, 4)
# strategy.objective -> R: its tables minimise ∫ (f' - q)² dx over [-R, R] (w uniform there); and their file.
OBJECTIVES = {"uniform10": 10.0, "uniform100": 100.0}
TABLES = {"uniform10": Path(__file__).with_name("fewbit_tables.json"),
          "uniform100": Path(__file__).with_name("fewbit_tables_uniform100.json")}

# Continuous activations: table name -> the op whose derivative is tabulated (torch's own, in float64).
CONTINUOUS = {
    "gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "silu": F.silu, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "softplus": F.softplus, "elu": F.elu, "celu": F.celu, "selu": F.selu,
    "mish": F.mish, "hardswish": F.hardswish, "logsigmoid": F.logsigmoid, "softsign": F.softsign,
}
# f'(-x) = f'(x) ("even") or f'(-x) = 1 - f'(x) ("odd": f - x/2 is even).
SYMMETRY = {"tanh": "even", "sigmoid": "even", "softsign": "even", "gelu": "odd", "gelu_tanh": "odd",
            "silu": "odd", "softplus": "odd", "hardswish": "odd", "logsigmoid": "odd"}
STEPWISE = ("relu", "leaky_relu", "relu6", "hardtanh", "hardsigmoid")


# ---------------------------------------------------------------- tables: the DP optimum ----------

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


def exact_table(name: str, bits: int, **params) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact tables of stepwise activations, matching torch's backward at the kinks too (ReLU6,
    Hardtanh and Hardsigmoid have zero gradient at their upper kink: its border is the float below)."""
    below = lambda v: math.nextafter(v, -math.inf)  # noqa: E731
    if name == "relu":
        borders, levels = [0.0], [0.0, 1.0]
    elif name == "leaky_relu":
        borders, levels = [0.0], [params.get("negative_slope", 0.01), 1.0]
    elif name in ("hardtanh", "relu6"):
        lo, hi = (0.0, 6.0) if name == "relu6" else (params.get("min_val", -1.0), params.get("max_val", 1.0))
        borders, levels = [lo, below(hi)], [0.0, 1.0, 0.0]
    elif name == "hardsigmoid":
        borders, levels = [-3.0, below(3.0)], [0.0, 1 / 6, 0.0]
    else:
        raise ConfigError(f"no exact table for {name!r}; stepwise activations: {', '.join(STEPWISE)}.")
    if len(levels) > 2**bits:
        raise ConfigError(f"{name} has {len(levels)} gradient levels: its exact table needs 2 bits, "
                          f"not {bits}.")
    pad = 2**bits - len(levels)  # repeat the last border (empty intervals) and level
    return torch.tensor(borders + borders[-1:] * pad, dtype=torch.float64), \
        torch.tensor(levels + levels[-1:] * pad, dtype=torch.float64)


def exact_bits(name: str) -> int:
    return 1 if name in ("relu", "leaky_relu") else 2


@cache
def _shipped(objective: str) -> dict:
    with open(TABLES[objective]) as f:
        return json.load(f)


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ConfigError(
            f"strategy.objective={objective!r}: fewbit's tables minimise ∫ (f' - q)² w with w uniform on "
            f"[-R, R]; valid values: {', '.join(f'{k} (R={v:g})' for k, v in OBJECTIVES.items())}. "
            "uniform10 is the default, uniform100 the official table generator's domain.")


def derivative_table(name: str, bits: int, objective: str = "uniform10") -> tuple[torch.Tensor, torch.Tensor]:
    """(borders, levels): float64 1-D tensors of 2**bits - 1 inner borders and 2**bits levels (SPEC.md).
    Continuous activations: the shipped DP optimum for `objective`; stepwise ones: the exact table
    (default parameters)."""
    if bits not in BITS:
        raise ConfigError(f"fewbit bits={bits}: tables exist for {', '.join(map(str, BITS))} bits.")
    check_objective(objective)
    if name in STEPWISE:
        return exact_table(name, bits)
    tables = _shipped(objective)["tables"]
    if name not in tables:
        raise ConfigError(f"no few-bit table for {name!r}; known: {', '.join(sorted([*tables, *STEPWISE]))}.")
    t = tables[name][str(bits)]
    return torch.tensor(t["borders"], dtype=torch.float64), torch.tensor(t["levels"], dtype=torch.float64)


# ---------------------------------------------------------------- the strategy --------------------

@dataclass
class FewbitConfig:
    name: str = "fewbit"
    bits: int = 3  # code width of continuous activations (1..4); stepwise ones use their exact 1 or 2
    # the tables' weight w in ∫ (f' - q)² w: uniform on [-10, 10] ("uniform10") or on [-100, 100]
    # ("uniform100", the official table generator's domain)
    objective: str = "uniform10"


class _FewBitFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, act, borders, levels, bits):
        packed = bucketize_pack(x, borders, bits)
        ctx.save_for_backward(*packed.tensors())
        ctx.shell = packed.with_tensors(t.new_empty(0) for t in packed.tensors())  # shape, bits, layout
        ctx.levels, ctx.dtype = levels, x.dtype
        return act(x)

    @staticmethod
    def backward(ctx, grad_out):
        packed = ctx.shell.with_tensors(ctx.saved_tensors)
        return lookup_mul(packed, ctx.levels, grad_out).to(ctx.dtype), None, None, None, None


class FewBit(Claimed, nn.Module):
    """`act` forward, bit for bit; backward from a `bits`-bit code of the input."""

    def __init__(self, act: nn.Module, borders: torch.Tensor, levels: torch.Tensor, bits: int):
        super().__init__()
        self.act, self.bits = act, bits
        self.register_buffer("borders", borders, persistent=False)
        self.register_buffer("levels", levels, persistent=False)

    def forward(self, x):
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self.act(x)
        return _FewBitFn.apply(x, self.act, self.borders, self.levels, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _table_name(m: nn.Module, where: str = "") -> str | None:
    """The table that serves module m, None if m is not an activation we know; StrategyError if we know
    it but have no table for its parameters."""
    simple = {nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SELU: "selu", nn.Mish: "mish",
              nn.Hardswish: "hardswish", nn.LogSigmoid: "logsigmoid", nn.Softsign: "softsign",
              nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh",
              nn.Hardsigmoid: "hardsigmoid"}
    kind = type(m)
    if kind in simple:
        return simple[kind]
    defaults = {nn.GELU: ("approximate", ("none", "tanh")), nn.ELU: ("alpha", (1.0,)),
                nn.CELU: ("alpha", (1.0,)), nn.Softplus: ("beta", (1.0,))}
    if kind not in defaults:
        return None
    key, ok = defaults[kind]
    if getattr(m, key) not in ok or (kind is nn.Softplus and m.threshold != 20.0):
        extra = " and threshold=20" if kind is nn.Softplus else ""
        raise StrategyError(f"fewbit has no table for layer {where!r}, {m}: tables cover {kind.__name__} "
                            f"with {key} in {ok}{extra}. Use those settings, or strategy=forward_ad "
                            "(exact gradients for any activation).")
    return "gelu_tanh" if kind is nn.GELU and m.approximate == "tanh" else kind.__name__.lower()


def _make(m: nn.Module, bits: int, objective: str) -> FewBit:
    name = _table_name(m)
    if hasattr(m, "inplace"):
        m.inplace = False  # the Function's output must be a new tensor; the values are the same
    if name in STEPWISE:
        params = {k: getattr(m, k) for k in ("negative_slope", "min_val", "max_val") if hasattr(m, k)}
        bits = exact_bits(name)
        return FewBit(m, *exact_table(name, bits, **params), bits)
    return FewBit(m, *derivative_table(name, bits, objective), bits)


@STRATEGIES.register("fewbit", schema=FewbitConfig)
def apply_fewbit(model: nn.Module, cfg) -> nn.Module:
    if cfg.bits not in BITS:
        raise ConfigError(f"strategy.bits={cfg.bits}: fewbit has tables for 1, 2, 3 and 4 bits.")
    check_objective(cfg.objective)
    select = lambda name, m: _table_name(m, name) is not None  # noqa: E731
    replaced = replace_modules(model, select, lambda m: _make(m, cfg.bits, cfg.objective))
    if not replaced:
        raise StrategyError(
            f"fewbit found no activation module to replace in {type(model).__name__} (it replaces "
            "nn.GELU, nn.SiLU, nn.ReLU, ... modules; activations called as functions are not seen, and "
            "modules claimed by an earlier strategy are left alone). Use a model with activation modules.")
    return model
