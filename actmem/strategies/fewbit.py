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
Each set is the exact optimum over borders on a grid (step 1/210 on [-10, 10], cells growing 1% each
beyond), found by dynamic programming (actmem.strategies.fewbit_solver). Tables are computed once by
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

import torch
import torch.nn as nn
import torch.nn.functional as F

from actmem.compress.index import bucketize_pack, lookup_mul
from actmem.core.errors import ConfigError, StrategyError
from actmem.strategies.base import STRATEGIES, Claimed, replace_modules
from actmem.strategies.ops import load_packed, save_packed

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
    """(borders, levels): float64 1-D tensors of 2**bits - 1 inner borders and 2**bits levels (docs/contracts.md).
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
        save_packed(ctx, [bucketize_pack(x, borders, bits)])
        ctx.levels, ctx.dtype = levels, x.dtype
        return act(x)

    @staticmethod
    def backward(ctx, grad_out):
        (packed,), _ = load_packed(ctx)
        return lookup_mul(packed, ctx.levels, grad_out).to(ctx.dtype), None, None, None, None


class FewBit(Claimed):
    """Mixin: `FewBit.swap(act, ...)` is the activation, forward bit for bit; backward from a `bits`-bit
    code of its input."""

    def forward(self, x):
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return _FewBitFn.apply(x, super().forward, self.borders, self.levels, self.bits)

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [super().extra_repr(), f"bits={self.bits}"]))


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
    if name in STEPWISE:
        params = {k: getattr(m, k) for k in ("negative_slope", "min_val", "max_val") if hasattr(m, k)}
        bits = exact_bits(name)
        borders, levels = exact_table(name, bits, **params)
    else:
        borders, levels = derivative_table(name, bits, objective)
    new = FewBit.swap(m, bits=bits)
    if hasattr(new, "inplace"):
        new.inplace = False  # the Function's output must be a new tensor; the values are the same
    new.register_buffer("borders", borders, persistent=False)
    new.register_buffer("levels", levels, persistent=False)
    return new


def check_fewbit(cfg) -> None:
    if cfg.bits not in BITS:
        raise ConfigError(f"strategy.bits={cfg.bits}: fewbit has tables for 1, 2, 3 and 4 bits.")
    check_objective(cfg.objective)


@STRATEGIES.register("fewbit", schema=FewbitConfig, check=check_fewbit)
def apply_fewbit(model: nn.Module, cfg) -> nn.Module:
    select = lambda name, m: _table_name(m, name) is not None  # noqa: E731
    replaced = replace_modules(model, select, lambda m: _make(m, cfg.bits, cfg.objective))
    if not replaced:
        raise StrategyError(
            f"fewbit found no activation module to replace in {type(model).__name__} (it replaces "
            "nn.GELU, nn.SiLU, nn.ReLU, ... modules; activations called as functions are not seen, and "
            "modules claimed by an earlier strategy are left alone). Use a model with activation modules.")
    return model
