"""Max batch search (issue 14): budgets, the doubling-and-bisection search on a fake oracle, the CPU
estimate against a step whose memory is known in closed form and against one whose small batches hide
the slope (issue 22: no step measured beyond the budget or the time limit), and the command line."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from helpers import REPO
from hydra import compose, initialize_config_dir

from actmem import maxbatch as mb
from actmem.core.config import CONFIG_DIR
from actmem.core.errors import ConfigError
from actmem.measure.batch_search import Fit, Job, estimate, parse_bytes, search, trials
from actmem.measure.memtrack import Peak

D = K = 256  # the toy: Linear(D, K) without bias, SGD with momentum
# Its step peak in closed form is the larger of two lines (tests/measure/test_memtrack.py derives the first):
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
    fit = Fit.of([(n, job.peak(n).bytes) for n in (2, 4, 8)])
    assert (fit.a, fit.b, fit.worst) == (A1, B1, 0.0)
    for budget in (A1 + B1, A1 + 100 * B1 - 1, A1 + 100 * B1, 1_000_000):  # on the first line
        assert fit.solve(budget) == closed_form(budget)
    for budget in (A1 + B1, A1 + 100 * B1):
        lines = []
        result = estimate(job, budget, log=lines.append)
        n = closed_form(budget)
        assert result.peak == A1 + B1 * result.batch <= budget
        assert all(" fits (peak " in line for line in lines[1:] if line.startswith("batch")), lines  # after the first
        # This step's gradient, as big as W, is not held in forward: nothing measured rules out a moment that
        # grows by all that is not held throughout (the gradient too) over the batch, so the steps stop where
        # the next could exceed the budget, a sample or two below the line's answer, and a note says so.
        assert result.batch == n and "confirmed: measured" in result.how or (
            n - 2 <= result.batch < n and lines[-1].startswith(f"Note: the max batch given, {result.batch},")
            and f"the line's answer, {n}, not measured (the next step could exceed memory_budget)" in result.how)
    assert estimate(job, A1 + B1 - 1).batch == 0


@pytest.mark.parametrize("batch", [160, 200])
def test_past_the_kink_the_measured_steps_find_the_exact_batch(batch):
    """Beyond batch K/2 the small batches' line underestimates the peak; the secant through the measured
    steps lands on the answer of the second line."""
    budget = A2 + B2 * batch + B2 // 2
    lines = []
    result = estimate(linear_job(), budget, log=lines.append)
    assert result.batch == closed_form(budget) == batch and "confirmed: measured" in result.how
    assert result.peak == A2 + B2 * batch
    assert all(" fits (peak " in line for line in lines), lines  # the first line's answer is not measured


def test_unconfirmed_estimates_say_so():
    result = estimate(linear_job(), A1 + 100 * B1, confirm_below=0)
    assert result.batch == 100 and "not measured" in result.how


MIB = 2**20


class Hidden:
    """A step whose small batches' peak is the optimizer's moment (parameters, gradients and momentum:
    flat in the batch) and whose large batches' is backward's (3 MiB a sample): the line through batches
    2-8 puts the answer at 2 GiB ~300 times too far, the reported probe's case (resnet18 under actnn).
    Each measured step takes `seconds` a sample on the clock `now`."""

    P = 40 * MIB  # parameter bytes
    device = torch.device("cpu")
    name = "the hidden slope"

    def __init__(self, seconds: float = 0.0):
        self.seconds, self.now, self.measured = seconds, 0.0, {}  # batch -> step peak, in the order measured

    def peak(self, n: int) -> Peak:
        self.now += self.seconds * n
        total = self.measured[n] = max(3 * self.P + 10 * 2**10 * n, 2 * self.P + 3 * MIB * n)
        return Peak(total, {"params": self.P, "grads": 0, "optimizer": self.P, "activations": 0,
                            "transient": total - 2 * self.P})

    def answer(self, budget: int) -> int:
        return (budget - 2 * self.P) // (3 * MIB)


def test_no_step_is_measured_beyond_the_budget_and_each_is_logged():
    job, budget, lines = Hidden(), 2 * 2**30, []
    result = estimate(job, budget, log=lines.append)
    assert result.batch == job.answer(budget) == 656 and "confirmed: measured" in result.how
    assert max(job.measured.values()) <= budget  # the old refinement measured batch 196596: 576 GiB
    assert len(job.measured) <= 6
    assert [int(line.split()[1].rstrip(":")) for line in lines] == list(job.measured)
    assert all(re.fullmatch(r"batch \d+: fits \(peak [\d.]+ [MG]iB\), \d+\.\d s", line) for line in lines), lines


def test_a_step_that_would_end_past_the_time_limit_is_not_started_and_the_note_says_what_it_takes(monkeypatch):
    job, budget, lines = Hidden(seconds=0.1), 2 * 2**30, []
    monkeypatch.setattr(sys.modules[estimate.__module__], "time", SimpleNamespace(monotonic=lambda: job.now))
    result = estimate(job, budget, time_limit=20, log=lines.append)
    assert list(job.measured) == [2, 4, 8]  # batch 392, the next step, would take 39 s
    assert result.batch == 8 and "the line's answer, 197" in result.how and "past time_limit" in result.how
    note = lines[-1]
    assert note.startswith("Note: the max batch given, 8, is the largest measured to fit")
    assert "batch 392, would take about 39 s and end past time_limit=20 s" in " ".join(note.split())
    assert "time_limit=40 or more" in note and "\n\n" not in note
    job = Hidden(seconds=0.1)  # the clock is the new job's
    with pytest.raises(ConfigError, match=r"fit_batches=\[2, 4, 256\]: the step at batch 256 would take about 26 s"):
        estimate(job, budget, batches=(2, 4, 256), time_limit=20)


def test_fit_batches_above_one_that_does_not_fit_are_not_measured():
    job = Hidden()
    result = estimate(job, 3 * job.P + 30 * 2**10, batches=(2, 4, 8))  # fits batch 3, not 4
    assert list(job.measured) == [2, 4] and result.batch == 2 and "the line's answer, 3, not measured" in result.how
    job = Hidden()
    assert estimate(job, 2 * job.P, batches=(4, 8)).batch == 0 and list(job.measured) == [4, 1]


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


PROGRESS = re.compile(r"batch (\d+): (fits|does not fit) \(peak ([\d.]+) (KiB|MiB|GiB)\), \d+\.\d s")


def progress_lines(stderr: str) -> list[re.Match]:
    """The trials' lines on stderr (PyTorch's own warnings may come between them)."""
    lines = [PROGRESS.fullmatch(line) for line in stderr.splitlines() if re.match(r"batch \d+: ", line)]
    assert all(lines), stderr
    return lines


def test_a_budget_below_batch_1_is_refused_in_one_paragraph(tmp_path):
    res = maxbatch("memory_budget=1MiB", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert [(m[1], m[2]) for m in progress_lines(res.stderr)] == [("2", "does not fit"), ("1", "does not fit")]
    error = res.stderr[res.stderr.index("Error: "):]
    assert "memory_budget=1.00 MiB is too small for a single sample" in " ".join(error.split())
    assert "at batch 1 needs" in " ".join(error.split()) and "\n\n" not in error.strip()


def test_no_step_beyond_the_budget_and_a_line_for_each(tmp_path):
    """The reported probe's case, smaller: resnet18 under actnn, whose small batches' peak is the optimizer's
    moment, flat in the batch (the old refinement measured a step of ~210 MiB here)."""
    budget = 160 * MIB
    res = maxbatch("model=resnet18", "strategy=actnn", "memory_budget=160MiB", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    steps = progress_lines(res.stderr)
    assert [m[1] for m in steps[:3]] == ["2", "4", "8"] and len(steps) > 3
    assert all(m[2] == "fits" and float(m[3]) * {"KiB": 2**10, "MiB": MIB, "GiB": 2**30}[m[4]] <= budget for m in steps)
    row = json.loads((tmp_path / "maxbatch.json").read_text())
    assert row["max batch"] == max(int(m[1]) for m in steps) and row["peak_bytes"] <= budget


@pytest.mark.parametrize("override, message", [
    ("memory_budget=0", "memory_budget='0' is not a memory size above zero"),
    ("memory_budget=-2GiB", "memory_budget='-2GiB' is not a memory size above zero"),
    ("memory_budget=inf", "memory_budget='inf' is not a memory size above zero"),
    ("confirm_below=-1", "confirm_below='-1' is not a memory size. Give bytes"),
    ("fit_batches=[0,2]", "fit_batches=[0, 2]: the line needs at least two different positive batches"),
    ("fit_batches=[4,4]", "fit_batches=[4, 4]: the line needs at least two different positive batches"),
    ("fit_batches=[8]", "fit_batches=[8]: the line needs at least two different positive batches"),
    ("time_limit=0", "time_limit=0 is not a time limit: give a positive, finite number of seconds, e.g. "
                     "time_limit=600."),
    ("time_limit=-5", "time_limit=-5 is not a time limit"),
    ("time_limit=nan", "time_limit=nan"),  # and "finite", in whichever check refuses it first
    ("time_limit=inf", "time_limit=inf"),
])
def test_limits_that_are_not_positive_and_finite_are_refused_naming_the_key(override, message):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("maxbatch", overrides=["dataset=synthetic", override])
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        mb.run(cfg)
    assert "time_limit" not in override or "finite" in str(refused.value)


def test_a_bad_budget_is_refused_from_the_command_line(tmp_path):
    res = maxbatch("memory_budget=lots", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "memory_budget='lots'" in res.stderr
    res = maxbatch("time_limit=0", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2 and res.stderr == "Error: time_limit=0 is not a time limit: give a positive, finite " \
        "number of seconds, e.g.\ntime_limit=600.\n"


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
