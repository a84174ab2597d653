"""Few-bit backward: the shipped tables are the DP optimum (checked against a brute-force search), each set
for its own objective (strategy.objective), the forward is unchanged bit for bit, backward is exactly
levels[code] * grad_out, and few bytes are kept."""
from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from helpers import REPO

from actmem import models, strategies
from actmem.core.errors import ConfigError, StrategyError
from actmem.measure import saved_bytes_by_module
from actmem.strategies.fewbit import BITS, CONTINUOUS, OBJECTIVES, SYMMETRY, TABLES, FewBit, derivative_table
from actmem.strategies.fewbit_solver import grid, mean_square_error, mirror, objective_grid, optimal_tables

LO, HI = -10.0, 10.0


def numeric_derivative(fn, x, h=1e-5):
    """Central differences of the op itself: independent of the autograd formula the tables use."""
    return (fn(x + h) - fn(x - h)) / (2 * h)


def l2_error(fn, borders, levels, n=2_000_000):
    """∫_LO^HI (f' - q)² dx by the midpoint rule on n points (independent of the generator's quadrature)."""
    h = (HI - LO) / n
    x = LO + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    q = levels[torch.bucketize(x, borders)]
    return float(((numeric_derivative(fn, x) - q) ** 2).sum() * h)


def brute_force(fn, bits, edges, weight=torch.ones_like):
    """min over every choice of 2**bits - 1 borders among the inner grid points `edges` of
    ∫ (f' - best constants)² w, by enumeration (midpoint rule, 2000 points a cell); returns (error, borders)."""
    cells, per_cell = len(edges) - 1, 2000
    h = (edges.diff() / per_cell)[:, None]
    x = edges[:-1, None] + h * (torch.arange(per_cell, dtype=torch.float64) + 0.5)
    d, w = numeric_derivative(fn, x), weight(x)
    moments = torch.stack([(w * h).sum(1), (w * d * h).sum(1), (w * d * d * h).sum(1)])
    prefix = torch.nn.functional.pad(moments.cumsum(1), (1, 0))
    combos = torch.tensor(list(itertools.combinations(range(1, cells), 2**bits - 1)))
    ends = torch.cat([torch.zeros(len(combos), 1, dtype=torch.long), combos,
                      torch.full((len(combos), 1), cells)], 1)
    w, a, b = (p[ends[:, 1:]] - p[ends[:, :-1]] for p in prefix)
    errors = (b - a * a / w).sum(1)
    best = int(errors.argmin())
    return float(errors[best]), edges[combos[best]].tolist()


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_tables_are_the_dp_optimum(name):
    fn = CONTINUOUS[name]
    edges = grid(LO, HI, 20)  # step 1: the kinks at 0 and +-3 are grid points; the shipped 4200-cell grid has them
    for bits in BITS:
        brute_err, brute_borders = brute_force(fn, bits, edges)
        # The DP on the coarse grid finds the brute-force optimum (same borders, or an equal-error twin).
        dp = optimal_tables(fn, edges, bits)[bits]
        assert dp["error"] == pytest.approx(brute_err, rel=1e-6, abs=1e-12), (bits, dp, brute_borders)
        # The shipped table (fine grid, a superset of the coarse one) is at least as good.
        borders, levels = derivative_table(name, bits)
        assert borders.shape == (2**bits - 1,) and levels.shape == (2**bits,)
        assert (borders.diff() > 0).all()
        shipped_err = l2_error(fn, borders, levels)
        assert shipped_err <= brute_err * (1 + 1e-6), (bits, shipped_err, brute_err)


def test_weighted_generator_matches_brute_force():
    """The weight is a parameter of the generator: a Gaussian weight moves the borders inwards."""
    normal = lambda x: torch.exp(-x * x / 8)  # noqa: E731  (N(0, 2²), unnormalised)
    for bits in (1, 2, 3):
        brute_err, brute_borders = brute_force(CONTINUOUS["silu"], bits, grid(LO, HI, 20), normal)
        dp = optimal_tables(CONTINUOUS["silu"], grid(LO, HI, 20), bits, weight=normal)[bits]
        assert dp["error"] == pytest.approx(brute_err, rel=1e-6)
        assert dp["borders"] == pytest.approx(brute_borders)
    assert max(map(abs, dp["borders"])) < max(derivative_table("silu", 3)[0].abs().tolist())


@pytest.mark.parametrize("name", ["gelu", "mish", "hardswish"])
def test_levels_are_interval_means_of_the_derivative(name):
    borders, levels = derivative_table(name, 3)
    edges = [LO, *borders.tolist(), HI]
    for (a, b), level in zip(zip(edges, edges[1:]), levels.tolist()):
        mean = (CONTINUOUS[name](torch.tensor(b, dtype=torch.float64))
                - CONTINUOUS[name](torch.tensor(a, dtype=torch.float64))) / (b - a)
        assert level == pytest.approx(float(mean), abs=1e-9)


def test_symmetric_functions_get_symmetric_tables():
    for name, kind in SYMMETRY.items():
        for bits in BITS:
            borders, levels = derivative_table(name, bits)
            table = {"borders": borders.tolist(), "levels": levels.tolist()}
            if kind == "odd":  # f'(x) + f'(-x) = 1: the optimum is unique, hence symmetric
                twin = mirror(table, kind)
                assert twin["borders"] == table["borders"], (name, bits)
                assert twin["levels"] == pytest.approx(table["levels"], abs=1e-9), (name, bits)
            else:  # even f': two mirror-image optima, equally good; we ship the one whose borders sum <= 0
                twin = mirror(table, kind)
                fn = CONTINUOUS[name]
                e0 = l2_error(fn, borders, levels, n=400_000)
                e1 = l2_error(fn, torch.tensor(twin["borders"]), torch.tensor(twin["levels"]), n=400_000)
                assert e0 == pytest.approx(e1, rel=1e-6) and sum(table["borders"]) <= 0, (name, bits)


@pytest.mark.parametrize("name", ["silu", "softsign"])
def test_graded_grid_dp_matches_brute_force(name):
    """The uniform100 grid has cells of unequal width: the DP is exact on such a grid too. A coarse one
    over [-100, 100] (step 2 on [-10, 10], tail cells doubling; softsign's 3-bit optimum has a border at -12)."""
    edges = objective_grid(100.0, cells=10, growth=2.0)
    assert len(edges) == 23 and torch.equal(edges, -edges.flip(0)) and (edges.diff() > 0).all()
    for bits in (1, 2, 3):
        brute_err, brute_borders = brute_force(CONTINUOUS[name], bits, edges)
        dp = optimal_tables(CONTINUOUS[name], edges, bits)[bits]
        assert dp["error"] == pytest.approx(brute_err, rel=1e-6), (bits, dp, brute_borders)


def test_objective_grids():
    assert torch.equal(objective_grid(10.0), grid(-10.0, 10.0, 4200))  # the default tables' grid, as shipped
    wide = objective_grid(100.0)
    assert wide[0] == -100 and wide[-1] == 100 and torch.equal(wide, -wide.flip(0)) and (wide.diff() > 0).all()
    inner = wide[(wide >= -10) & (wide <= 10)]
    assert torch.equal(inner, grid(-10.0, 10.0, 4200)) and len(wide) - len(inner) == 2 * 528
    assert wide.diff().max() < 0.91  # cells grow by 1% from 1/210: at most 1/210 + 1% of 90


@pytest.mark.parametrize("objective, name", [("uniform10", "tanh"), ("uniform100", "silu")])
def test_regenerating_the_tables_reproduces_the_shipped_ones(tmp_path, objective, name):
    out = tmp_path / "tables.json"
    res = subprocess.run([sys.executable, "scripts/fewbit_tables.py", "--objective", objective, "--only", name,
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    fresh = json.loads(out.read_text())
    shipped = json.loads(TABLES[objective].read_text())
    assert fresh["settings"] == shipped["settings"]
    for name in fresh["tables"]:  # tanh: an even derivative, so the mirror-image choice is checked too
        for bits, table in fresh["tables"][name].items():
            ship = shipped["tables"][name][bits]
            assert table["borders"] == ship["borders"], (name, bits)
            assert table["levels"] == pytest.approx(ship["levels"], abs=1e-12)


def test_report_evaluates_ours_and_the_official_tables(tmp_path):
    out = tmp_path / "report.md"
    res = subprocess.run([sys.executable, "scripts/fewbit_tables.py", "--report", str(out), "--only", "gelu",
                          "hardswish"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert "- command: `python scripts/fewbit_tables.py --report" in text and "- device: CPU" in text
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[3:-1]
            for line in text.splitlines() if line.startswith(("| gelu |", "| hardswish |"))}
    assert len(rows) == 8 and all(len(r) == 9 for r in rows.values())
    assert [c.strip() == "–" for c in rows["gelu", "2"]] == [False, False, True] * 3  # no official 2-bit GELU
    assert "–" not in "".join(rows["gelu", "3"]) and "–" not in "".join(rows["hardswish", "2"])


def test_each_table_set_is_best_for_its_own_objective():
    """Under w uniform on [-R, R] the set made for R has no larger error than the other set, for every
    activation and width; the evaluator agrees with the DP's own minimum for the set's own objective."""
    shipped = {o: json.loads(TABLES[o].read_text())["tables"] for o in OBJECTIVES}
    for own, other in itertools.permutations(OBJECTIVES):
        edges = objective_grid(OBJECTIVES[own])
        for name in sorted(CONTINUOUS):
            for bits in BITS:
                fn = CONTINUOUS[name]
                mine, theirs = (mean_square_error(fn, *derivative_table(name, bits, o), edges) for o in (own, other))
                assert mine <= theirs * (1 + 1e-9), (own, name, bits, mine, theirs)
                dp_error = shipped[own][name][str(bits)]["error"] / (2 * OBJECTIVES[own])
                assert mine == pytest.approx(dp_error, rel=1e-7), (own, name, bits)  # DP: prefix-sum rounding


def test_objective_option_selects_its_tables():
    torch.manual_seed(0)
    exact = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
    default = strategies.apply(copy.deepcopy(exact), "fewbit", bits=2)
    wide = strategies.apply(copy.deepcopy(exact), {"name": "fewbit", "bits": 2, "objective": "uniform100"})
    assert strategies.resolve("fewbit").objective == "uniform10"
    x = torch.randn(256, 8) * 4
    for model, objective in ((default, "uniform10"), (wide, "uniform100")):
        for i, name in ((1, "gelu"), (3, "silu")):
            borders, levels = derivative_table(name, 2, objective)
            assert torch.equal(model[i].borders, borders) and torch.equal(model[i].levels, levels)
            # the default is today's table, the file as shipped
            ship = json.loads(TABLES[objective].read_text())["tables"][name]["2"]
            assert borders.tolist() == ship["borders"] and levels.tolist() == ship["levels"]
        assert torch.equal(model(x), exact(x))  # forward bit for bit
        # backward at each activation: levels[code] * grad_out of the selected table
        h = model[0](x).detach().requires_grad_()
        g = torch.randn_like(h)
        model[1](h).backward(g)
        borders, levels = derivative_table("gelu", 2, objective)
        assert torch.equal(h.grad, levels.float()[torch.bucketize(h.detach().double(), borders)] * g)
    assert not torch.equal(default[1].borders, wide[1].borders)
    assert not torch.equal(default[3].levels, wide[3].levels)


def test_exact_tables_of_stepwise_activations():
    """Bit for bit torch's gradient, at the kinks too. In bf16 the slope (0.2, 1/6) is rounded to bf16
    before the product (lookup_mul's contract), torch multiplies in fp32: equal up to one rounding."""
    acts = [nn.ReLU(), nn.LeakyReLU(0.2), nn.ReLU6(), nn.Hardtanh(-2.0, 0.5), nn.Hardsigmoid(),
            nn.ReLU(inplace=True)]
    kinks = torch.tensor([0.0, -3.0, 3.0, 6.0, -2.0, 0.5, -1.0, 1.0])
    for act in acts:
        model = strategies.apply(nn.Sequential(copy.deepcopy(act)), "fewbit", bits=4)
        one_bit = isinstance(act, (nn.ReLU, nn.LeakyReLU))
        assert isinstance(model[0], FewBit) and model[0].bits == (1 if one_bit else 2)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.cat([kinks, torch.randn(1000) * 4]).to(dtype)
            g = torch.randn_like(x)
            xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
            ye, yf = copy.deepcopy(act)(xe.clone()), model(xf)
            assert torch.equal(ye, yf)
            ye.backward(g), yf.backward(g)
            if dtype == torch.float32 or isinstance(act, (nn.ReLU, nn.Hardtanh)):
                assert torch.equal(xe.grad, xf.grad), (act, dtype)
            else:
                torch.testing.assert_close(xf.grad, xe.grad, rtol=8e-3, atol=0)
                assert torch.equal(xf.grad == 0, xe.grad == 0)


@pytest.mark.parametrize("bits", BITS)
def test_backward_is_levels_of_code_times_grad(bits):
    borders, levels = derivative_table("gelu", bits)
    layer = strategies.apply(nn.Sequential(nn.GELU()), "fewbit", bits=bits)
    x = torch.cat([borders.float(), torch.randn(3001) * 3]).requires_grad_()  # borders themselves included
    g = torch.randn_like(x)
    y = layer(x)
    assert torch.equal(y, nn.functional.gelu(x))
    y.backward(g)
    codes = torch.bucketize(x.detach().double(), borders)  # code i: borders[i-1] < x <= borders[i]
    assert torch.equal(x.grad, levels.float()[codes] * g)
    # Only the packed codes are kept: `bits` bits per element.
    saved = saved_bytes_by_module(layer, x)
    assert saved == {"0": bits * ((x.numel() + 7) // 8)}


def _vit_pair(**fewbit):
    torch.manual_seed(0)
    exact = models.build("vit_tiny", num_classes=10, depth=2)
    return exact, strategies.apply(copy.deepcopy(exact), "fewbit", **fewbit)


def test_forward_is_bit_identical_and_gradients_approach_exact_as_bits_grow():
    x, target = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    errors = []
    for bits in BITS:
        exact, few = _vit_pair(bits=bits)
        for m in (exact, few):
            m.zero_grad()
            out = m(x)
            nn.functional.cross_entropy(out, target).backward()
        assert torch.equal(exact(x), few(x))
        ge = torch.cat([p.grad.flatten() for p in exact.parameters()])
        gf = torch.cat([p.grad.flatten() for p in few.parameters()])
        errors.append(float((gf - ge).norm() / ge.norm()))
        exact.eval(), few.eval()
        with torch.no_grad():
            assert torch.equal(exact(x), few(x))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.25 * errors[0], errors


@pytest.mark.parametrize("name, act", [("efficientnet_b0", nn.SiLU), ("convnext_tiny", nn.GELU)])
def test_torchvision_models(name, act):
    torch.manual_seed(0)
    exact = models.build(name, num_classes=10)
    few = strategies.apply(copy.deepcopy(exact), "fewbit", bits=2)
    assert all(isinstance(m, FewBit) for m in few.modules() if isinstance(m, act))
    assert sum(isinstance(m, act) for m in few.modules()) == sum(type(m) is act for m in exact.modules())
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    out_e = exact(x)
    torch.manual_seed(1)
    out_f = few(x)  # train mode: the same stochastic-depth draws
    assert torch.equal(out_e, out_f)
    out_f.sum().backward()
    assert all(p.grad is not None for p in few.parameters() if p.requires_grad)


def test_refusals():
    with pytest.raises(ConfigError, match="bits"):
        strategies.apply(nn.Sequential(nn.GELU()), "fewbit", bits=5)
    with pytest.raises(StrategyError, match=r"'1'.*alpha"):
        strategies.apply(nn.Sequential(nn.Linear(2, 2), nn.ELU(alpha=0.5)), "fewbit")
    with pytest.raises(StrategyError, match="no activation module"):
        strategies.apply(nn.Sequential(nn.Linear(2, 2)), "fewbit")
    with pytest.raises(ConfigError, match="known"):
        derivative_table("swish", 2)
    with pytest.raises(ConfigError, match="2 bits"):
        derivative_table("relu6", 1)
    # an unknown objective: one paragraph naming the key and the valid values, before any module is touched
    with pytest.raises(ConfigError, match=r"strategy\.objective='uniform1000'.*uniform10 .*uniform100 ") as e:
        strategies.apply(nn.Sequential(nn.ReLU()), "fewbit", objective="uniform1000")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="strategy.objective"):
        derivative_table("relu", 1, "normal")
