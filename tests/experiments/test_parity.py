"""The parity protocol (actmem.experiments.parity): the table's arithmetic on made-up summaries, n/a and failed rows,
the seed-major order and the deadline with an injected trainer and clock, one real run in-process, and
scripts/parity.py."""
from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys

import pytest
from helpers import REPO

from actmem.core.errors import ActmemError, StrategyError
from actmem.experiments import parity
from actmem.experiments.parity import RunResult, Variant, run_protocol, summarize, table

LABELS = ["exact", "actnn L3", "blpa", "fewbit 2"]


def completed(label: str, seed: int, acc: float, img_s: float, ratio: float | None = None) -> RunResult:
    summary = {"status": "completed", "test_acc": acc, "throughput_img_s": img_s, "activation_ratio": ratio}
    return RunResult(label, seed, "completed", summary, None, 1.0)


def made_up() -> list[RunResult]:
    return [
        completed("exact", 0, 94.0, 1000.0, 1.0), completed("exact", 1, 94.2, 1200.0),
        completed("exact", 2, 93.8, 1100.0),
        completed("actnn L3", 0, 93.5, 800.0, 4.5), completed("actnn L3", 1, 93.9, 900.0),
        RunResult("blpa", 0, "n/a", None, "blpa found no BatchNorm2d -> ReLU -> Conv2d chain", 0.1),
        completed("fewbit 2", 0, 93.0, 950.0, 1.25),
        RunResult("fewbit 2", 1, "failed", {"status": "failed", "test_acc": None, "activation_ratio": None},
                  "DivergedError: loss is nan", 2.0),
    ]


def test_summary_arithmetic_matches_hand_computed_figures():
    rows = {r.label: r for r in summarize(made_up(), LABELS)}
    exact, actnn = rows["exact"], rows["actnn L3"]
    assert exact.n == 3 and exact.acc_mean == pytest.approx(94.0) and exact.acc_std == pytest.approx(0.2)
    assert exact.delta is None and exact.img_s == pytest.approx(1100.0) and exact.speed_vs_reference == 1.0
    assert actnn.n == 2 and actnn.acc_mean == pytest.approx(93.7)
    assert actnn.acc_std == pytest.approx(math.sqrt(0.08))  # (0.2² + 0.2²) / (2 - 1)
    assert actnn.delta == pytest.approx(-0.3)
    assert actnn.delta_se == pytest.approx(math.sqrt(0.04 / 3 + 0.08 / 2))  # 0.2309
    assert actnn.activation_ratio == 4.5  # seed 0 measured it; seed 1 did not
    assert actnn.img_s == pytest.approx(850.0) and actnn.speed_vs_reference == pytest.approx(850 / 1100)
    text = str(table(list(rows.values())))
    assert "| exact | 3 | 94.00 ± 0.20 | reference | 1.00 | 1100 | 1.00 |  |" in text
    assert "| actnn L3 | 2 | 93.70 ± 0.28 | -0.30 ± 0.23 | 4.50 | 850 | 0.77 |  |" in text


def test_refused_and_failed_runs_are_rows_with_their_reason():
    rows = {r.label: r for r in summarize(made_up(), LABELS)}
    blpa, fewbit = rows["blpa"], rows["fewbit 2"]
    assert (blpa.n, blpa.acc_mean, blpa.img_s) == (0, None, None)
    assert blpa.note == "n/a: blpa found no BatchNorm2d -> ReLU -> Conv2d chain"
    # One completed run of two: a mean, no spread, no difference to exact; the failure named.
    assert (fewbit.n, fewbit.acc_mean, fewbit.acc_std, fewbit.delta, fewbit.delta_se) == (1, 93.0, None, None, None)
    assert fewbit.img_s == 950.0 and fewbit.activation_ratio == 1.25
    assert fewbit.note == "1 of 2 failed (seed 1: DivergedError: loss is nan)"
    text = str(table(list(rows.values())))
    assert "| blpa | 0 | - | - | - | - | - | n/a: blpa found no" in text
    assert "| fewbit 2 | 1 | 93.00 | - | 1.25 | 950 | 0.86 | 1 of 2 failed" in text


def test_no_difference_without_two_exact_runs_and_a_row_for_labels_not_run():
    results = [completed("exact", 0, 94.0, 1000.0), completed("actnn L3", 0, 93.0, 500.0),
               completed("actnn L3", 1, 93.4, 500.0)]
    rows = {r.label: r for r in summarize(results, ["exact", "actnn L3", "combo"])}
    assert rows["actnn L3"].delta is None and rows["actnn L3"].speed_vs_reference == pytest.approx(0.5)
    assert rows["combo"].n == 0 and rows["combo"].note == "not run (deadline)"


class FakeTrainer:
    """Records each call; each run takes `seconds[label]` of a fake clock; raises what `raises` names."""

    def __init__(self, seconds: dict[str, float] | None = None, raises: dict | None = None):
        self.now = 0.0
        self.calls: list[tuple[list[str], str]] = []
        self.seconds = seconds or {}
        self.raises = raises or {}

    def clock(self) -> float:
        return self.now

    def __call__(self, overrides, path) -> dict:
        self.calls.append((list(overrides), str(path)))
        strategy = next(o for o in overrides if o.startswith("strategy="))
        seed = next(int(o.removeprefix("seed=")) for o in overrides if o.startswith("seed="))
        self.now += self.seconds.get(strategy, 1.0)
        if (strategy, seed) in self.raises:
            raise self.raises[strategy, seed]
        return {"status": "completed", "test_acc": 90.0 + seed, "throughput_img_s": 100.0}


VARIANTS = (Variant("exact", ("strategy=exact",)), Variant("blpa", ("strategy=blpa",)),
            Variant("fewbit 2", ("strategy=fewbit", "strategy.bits=2")))


def test_seed_major_order_and_activations_measured_on_seed_zero_only(tmp_path):
    fake = FakeTrainer()
    protocol = run_protocol(VARIANTS, 2, ["experiment=airbench94"], tmp_path, trainer=fake, clock=fake.clock)
    assert [(r.label, r.seed) for r in protocol.results] == [
        ("exact", 0), ("blpa", 0), ("fewbit 2", 0), ("exact", 1), ("blpa", 1), ("fewbit 2", 1)]
    assert fake.calls[2] == (["experiment=airbench94", "strategy=fewbit", "strategy.bits=2", "seed=0"],
                             str(tmp_path / "fewbit_2" / "seed0"))
    assert fake.calls[3] == (["experiment=airbench94", "strategy=exact", "seed=1",
                              "trainer.measure_activations=false"], str(tmp_path / "exact" / "seed1"))
    assert protocol.stopped == "" and protocol.seeds() == (2, 2)


def test_a_refusal_is_tried_once_and_a_failure_does_not_stop_the_others(tmp_path):
    fake = FakeTrainer(raises={("strategy=blpa", 0): StrategyError("no BN-ReLU-Conv chain"),
                               ("strategy=exact", 1): RuntimeError("CUDA error")})
    protocol = run_protocol(VARIANTS, 3, [], tmp_path, trainer=fake, clock=fake.clock)
    outcome = [(r.label, r.seed, r.status, r.error) for r in protocol.results]
    assert outcome == [("exact", 0, "completed", None), ("blpa", 0, "n/a", "no BN-ReLU-Conv chain"),
                       ("fewbit 2", 0, "completed", None), ("exact", 1, "failed", "RuntimeError: CUDA error"),
                       ("fewbit 2", 1, "completed", None), ("exact", 2, "completed", None),
                       ("fewbit 2", 2, "completed", None)]
    assert protocol.seeds() == (3, 3)  # blpa, refused, is not counted


def test_deadline_ends_at_the_first_run_that_would_not_fit(tmp_path):
    # exact takes 10 s, fewbit 30 s: round 0 ends at 41 s (blpa 1 s). At 41 s exact's 10 s fit before 70;
    # at 52 s, blpa's 1 s fits; at 53 s fewbit's 30 s would end past 70: stop there.
    fake = FakeTrainer(seconds={"strategy=exact": 10.0, "strategy=fewbit": 30.0})
    protocol = run_protocol(VARIANTS, 5, [], tmp_path, deadline=70.0, trainer=fake, clock=fake.clock)
    assert [(r.label, r.seed) for r in protocol.results] == [
        ("exact", 0), ("blpa", 0), ("fewbit 2", 0), ("exact", 1), ("blpa", 1)]
    assert protocol.stopped == "stopped before fewbit 2 seed 1: its seed 0 run took 30 s and 18 s were left"
    assert protocol.seeds() == (1, 2)


def test_no_run_starts_after_the_deadline(tmp_path):
    fake = FakeTrainer()
    fake.now = 100.0
    protocol = run_protocol(VARIANTS, 2, [], tmp_path, deadline=99.0, trainer=fake, clock=fake.clock)
    assert protocol.results == [] and fake.calls == []
    assert protocol.stopped == "the deadline passed before exact seed 0"


def test_select_keeps_the_protocols_order_and_refuses_unknown_labels():
    assert [v.label for v in parity.select("fewbit 3, exact")] == ["exact", "fewbit 3"]
    assert parity.select(None) == parity.PROTOCOL
    with pytest.raises(ActmemError, match="unknown strategy label 'actnn L9'.*actnn L3"):
        parity.select("exact,actnn L9")


TOY = ["dataset=synthetic", "dataset.train_size=8", "dataset.test_size=4", "model=airbench94",
       "trainer.batch_size=4", "trainer.max_steps=2", "trainer.device=cpu", "logger=none", "trainer.progress=false"]


def test_train_run_trains_in_process_reuses_a_completed_run_and_records_a_refusal(tmp_path):
    run_dir = tmp_path / "exact"
    summary = parity.train_run([*TOY, "strategy=exact"], run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 2 and summary["activation_ratio"] == 1.0
    written = (run_dir / "summary.json").stat().st_mtime_ns
    assert parity.train_run([*TOY, "strategy=exact"], run_dir) == summary  # read, not trained again
    assert (run_dir / "summary.json").stat().st_mtime_ns == written

    with pytest.raises(StrategyError, match="blpa found no BatchNorm2d"):
        parity.train_run([*TOY, "strategy=blpa"], tmp_path / "blpa")
    recorded = json.loads((tmp_path / "blpa" / "summary.json").read_text())
    assert recorded["status"] == "failed" and "blpa found no BatchNorm2d" in recorded["error"]


def test_script_writes_the_table_with_its_provenance(tmp_path, cifar10_root):
    out = tmp_path / "parity"
    res = subprocess.run(
        [sys.executable, "scripts/parity.py", "--seeds", "1", "--only", "exact,blpa", "--out", str(out), "--",
         f"dataset.root={cifar10_root}", "dataset.train_subset=8", "dataset.test_subset=4", "trainer.batch_size=4",
         "trainer.max_steps=2", "trainer.device=cpu", "logger=none"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = (out / "parity.md").read_text()
    for line in ("- command: `python scripts/parity.py --seeds 1", "- commit: ", "- device: CPU", "- date: ",
                 "- overrides: `experiment=airbench94 dataset.root="):
        assert line in text, text[:1500]
    assert "| exact | 1 | " in text and "| blpa | 0 | - | - | - | - | - | n/a: blpa found no" in text
    assert (out / "exact" / "seed0" / "summary.json").is_file()


@pytest.mark.parametrize("budget", ["0", "-5", "nan", "inf"])
def test_script_refuses_a_budget_that_is_not_a_positive_finite_number(budget, tmp_path, capsys):
    """0 used to mean no limit and a negative budget to run nothing with exit 0."""
    script = runpy.run_path(str(REPO / "scripts" / "parity.py"))  # its main, not run
    assert script["main"](["--seeds", "1", "--budget", budget, "--out", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "p").exists()
    assert capsys.readouterr().err == (f"parity.py: --budget {float(budget):g} is not a time limit: give a positive, "
                                       "finite number of seconds, e.g. --budget 600.\n")


def test_script_refuses_an_unknown_label_before_any_run(tmp_path):
    res = subprocess.run([sys.executable, "scripts/parity.py", "--seeds", "1", "--only", "exact,nosuch", "--out",
                          str(tmp_path / "p")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown strategy label 'nosuch'" in res.stderr, res.stderr
    assert not (tmp_path / "p").exists()
