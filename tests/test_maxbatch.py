"""Max batch search (issue 14): budgets, the doubling-and-bisection search on a fake oracle, the CPU
estimate against a step whose memory is known in closed form, and the command line."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
from helpers import REPO

from actmem.errors import ConfigError
from actmem.maxbatch import Fit, Job, estimate, parse_bytes, search, trials

D = K = 256  # the toy: Linear(D, K) without bias, SGD with momentum
# Its step peak in closed form is the larger of two lines (tests/test_memtrack.py derives the first):
# - as W's gradient is made: W, its momentum and the new gradient (4 D K bytes each) and two scalars;
#   per sample the input (kept for backward), the int64 label and the loss gradient w.r.t. the output;
# - in log_softmax's backward, from batch K/2 up: W and its momentum, two scalars; per sample the input,
#   the label and the log-probabilities (kept for backward), and two gradients the size of the output.
A1, B1 = 12 * D * K + 8, 4 * D + 8 + 4 * K
A2, B2 = 8 * D * K + 8, 4 * D + 8 + 12 * K


def closed_form(budget: int) -> int:
    return min((budget - A1) // B1, (budget - A2) // B2)

def linear_job() -> Job:
    def make_model():
        torch.manual_seed(0)
        return nn.Linear(D, K, bias=False)

    return Job(make_model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), (D,), K,
               torch.device("cpu"), "Linear(256, 256)")


@pytest.mark.parametrize("text, nbytes", [("16GiB", 16 * 2**30), ("12GB", 12 * 10**9), ("500MiB", 500 * 2**20),
                                          ("1073741824", 2**30), (1024, 1024), ("1.5 kib", 1536)])
def test_budgets_parse(text, nbytes):
    assert parse_bytes(text, "memory_budget") == nbytes


@pytest.mark.parametrize("text", ["lots", "16G", "-1GiB", "0", "", "1e9", "GiB"])
def test_bad_budgets_are_refused_naming_the_key(text):
    with pytest.raises(ConfigError, match=r"memory_budget=.* is not a memory size.*16GiB"):
        parse_bytes(text, "memory_budget")


def test_search_doubles_then_bisects():
    tried = []
    found = search(lambda n: tried.append(n) or n <= 37)
    assert found.batch == 37 and found.failed == 38 and found.exact
    assert tried == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert found.trials == [(n, n <= 37) for n in tried]


def test_search_from_a_start_that_fails_bisects_down():
    assert search(lambda n: n <= 37, start=50).batch == 37
    assert search(lambda n: False).batch == 0 and search(lambda n: False).trials == [(1, False)]


def test_search_stops_within_tolerance_or_when_told():
    coarse = search(lambda n: n <= 1000, tolerance=1 / 32)
    assert coarse.batch <= 1000 < coarse.failed <= coarse.batch * (1 + 1 / 32) and not coarse.exact
    cut = search(lambda n: n <= 1000, stop=lambda n: n > 100)
    assert (cut.batch, cut.failed, len(cut.trials)) == (64, None, 7)


def test_the_fit_recovers_the_closed_form_and_the_estimate_is_exact():
    job = linear_job()
    fit = Fit.of([(n, job.peak(n)) for n in (2, 4, 8)])
    assert (fit.a, fit.b, fit.worst) == (A1, B1, 0.0)
    for budget in (A1 + B1, A1 + 100 * B1 - 1, A1 + 100 * B1, 1_000_000):  # on the first line: one step confirms
        result = estimate(job, budget)
        assert result.batch == closed_form(budget) == fit.solve(budget)
        assert result.peak == A1 + B1 * result.batch <= budget and "confirmed: measured" in result.how
        assert ", then" not in result.how
    assert estimate(job, A1 + B1 - 1).batch == 0


@pytest.mark.parametrize("batch", [160, 200])
def test_past_the_kink_the_measured_steps_find_the_exact_batch(batch):
    """Beyond batch K/2 the small batches' line underestimates the peak; the secant through the measured
    steps lands on the answer of the second line."""
    budget = A2 + B2 * batch + B2 // 2
    result = estimate(linear_job(), budget)
    assert result.batch == closed_form(budget) == batch and "confirmed: measured" in result.how
    assert result.peak == A2 + B2 * batch


def test_unconfirmed_estimates_say_so():
    result = estimate(linear_job(), A1 + 100 * B1, confirm_below=0)
    assert result.batch == 100 and "not measured" in result.how


def test_trials_on_the_cpu_find_the_same_batch():
    """The suite's dry run: trials whose peak is the measured step peak, against the budget."""
    budget = A2 + 150 * B2 + 5
    result = trials(linear_job(), budget)
    assert result.batch == closed_form(budget) == 150 and result.failed == 151 and result.exact
    assert result.peak == A2 + 150 * B2
    cut = trials(linear_job(), budget, deadline=time.monotonic())  # the first trial runs, then none would end in time
    assert (cut.batch, cut.failed, cut.trials, cut.exact) == (1, None, 1, False)


def maxbatch(*overrides: str, multirun: bool = False):
    """`python -m actmem.maxbatch` on synthetic input, one CPU thread (the tests may share the cores)."""
    return subprocess.run([sys.executable, "-m", "actmem.maxbatch", *(["-m"] if multirun else []), "dataset=synthetic",
                           "trainer.threads=1", *overrides], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_budget_below_batch_1_is_refused_in_one_paragraph(tmp_path):
    res = maxbatch("memory_budget=1MiB", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    err = " ".join(res.stderr.split())
    assert "memory_budget=1.00 MiB is too small for a single sample" in err and "at batch 1 needs" in err
    assert res.stderr.startswith("Error: ") and "\n\n" not in res.stderr.strip()


def test_a_bad_budget_is_refused_from_the_command_line(tmp_path):
    res = maxbatch("memory_budget=lots", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "memory_budget='lots'" in res.stderr


def test_a_sweep_prints_one_row_per_strategy(tmp_path):
    res = maxbatch("memory_budget=24MiB", "strategy=exact,actnn", f"hydra.sweep.dir={tmp_path}", multirun=True)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| synthetic | resnet20 |")]
    assert len(rows) == 2 and res.stdout.count("| dataset | model |") == 1
    results = {r["strategy"]: r for r in map(json.loads, (p.read_text() for p in tmp_path.glob("*/maxbatch.json")))}
    assert set(results) == {"exact", "actnn L3"}
    for r in results.values():
        assert r["max batch"] >= 1 and r["peak_bytes"] <= r["budget_bytes"] == 24 * 2**20
        assert r["found by"].startswith("estimate from the step peak's affine fit at batches 2,4,8")
    assert results["actnn L3"]["max batch"] > 2 * results["exact"]["max batch"]
    assert math.isclose(results["exact"]["max batch"], 15, rel_tol=0.3)
