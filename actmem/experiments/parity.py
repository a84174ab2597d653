"""The parity protocol (issue 15): every strategy that serves the network, trained n times each with seeds
0..n-1, against exact; then one table of test accuracy (mean ± sample std), its difference to exact with
the standard error, the activation ratio, and throughput against exact.

All runs share one process (`train_run`: Hydra's compose API and actmem.runtime.lifecycle), so neither an
interpreter nor Hydra starts per run, and each Triton kernel compiles once. The order is seed-major (seed
0 of every strategy, then seed 1, ...): clock and thermal drift hit every strategy alike, and a protocol
stopped by its deadline still has balanced seeds. Activation bytes (and the profiler's step peak) are
measured on seed 0 only: they are a property of the model, batch and strategy, not of the seed.
"""
from __future__ import annotations

import gc
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from actmem.core.config import CONFIG_DIR
from actmem.core.errors import ActmemError, StrategyError
from actmem.experiments.gpu_suite.base import Table, num
from actmem.runtime.distributed import SINGLE
from actmem.runtime.lifecycle import execute, open_run
from actmem.runtime.rundir import SUMMARY
from actmem.runtime.setup import register_hydra


@dataclass(frozen=True)
class Variant:
    """One row of the protocol: a label and the Hydra overrides that select its strategy."""

    label: str
    overrides: tuple[str, ...]

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "_")


# Fixed widths of ActNN are its level L2 (Conv/Linear and BatchNorm inputs at a uniform width); L3 is
# the paper's adaptive 2-bit average.
PROTOCOL = (
    Variant("exact", ("strategy=exact",)),
    Variant("checkpoint", ("strategy=checkpoint",)),
    Variant("actnn L3", ("strategy=actnn", "strategy.level=L3")),
    Variant("actnn 2-bit", ("strategy=actnn", "strategy.level=L2", "strategy.bits=2")),
    Variant("actnn 4-bit", ("strategy=actnn", "strategy.level=L2", "strategy.bits=4")),
    Variant("division", ("strategy=division",)),
    Variant("blpa", ("strategy=blpa",)),
    Variant("fewbit 2", ("strategy=fewbit", "strategy.bits=2")),
    Variant("fewbit 3", ("strategy=fewbit", "strategy.bits=3")),
    Variant("forward_ad", ("strategy=forward_ad",)),
    Variant("combo", ("strategy=combo",)),
)
REFERENCE = "exact"
NOT_MEASURED = ("trainer.measure_activations=false",)  # seeds after the first


def select(labels: str | None) -> tuple[Variant, ...]:
    """The variants named in `labels` (comma-separated), in the protocol's order; all for None."""
    if labels is None:
        return PROTOCOL
    wanted = [s.strip() for s in labels.split(",") if s.strip()]
    known = {v.label for v in PROTOCOL}
    unknown = [s for s in wanted if s not in known]
    if unknown or not wanted:
        raise ActmemError(f"unknown strategy label {', '.join(map(repr, unknown)) or '(none named)'}; the protocol's "
                          f"labels are: {', '.join(v.label for v in PROTOCOL)}.")
    return tuple(v for v in PROTOCOL if v.label in wanted)


def compose_config(overrides: Sequence[str]):
    """The config `python -m actmem.train OVERRIDES` would run (Hydra's errors for a bad override)."""
    register_hydra()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def train_run(overrides: Sequence[str], path: Path) -> dict:
    """One training run in this process, into run directory `path`, as `python -m actmem.train` runs it
    (actmem.runtime.lifecycle); returns its summary. A directory that already holds this run, completed,
    is read, not trained again (a protocol started again with the same --out picks up where it stopped).
    What the run raised is recorded in its summary ("failed"), then raised."""
    cfg = compose_config(overrides)
    opened = open_run(cfg, path, lambda cfg: SINGLE)
    if opened is not None:
        try:
            ending = execute(cfg, *opened)
        finally:
            # The next run's allocator peak must not count what this one left: a full collection frees what
            # reference cycles (strategy hooks and their modules) hold, then the cache goes back.
            if torch.cuda.is_available():
                gc.collect()
                torch.cuda.empty_cache()
        if ending is not None:
            raise ending.error
    return json.loads((path / SUMMARY).read_text())


@dataclass(frozen=True)
class RunResult:
    label: str
    seed: int
    status: str  # "completed", "failed" or "n/a" (the strategy refuses the model)
    summary: dict | None  # summary.json, where the run got as far as writing one
    error: str | None
    seconds: float


@dataclass
class ProtocolRun:
    results: list[RunResult] = field(default_factory=list)
    stopped: str = ""  # why the protocol ended before all its runs; empty when none was left out

    def seeds(self) -> tuple[int, int]:
        """(fewest, most) runs of a variant that was tried: seed-major order keeps them at most 1 apart."""
        counts = {}
        for r in self.results:
            if r.status != "n/a":
                counts[r.label] = counts.get(r.label, 0) + 1
        return (min(counts.values()), max(counts.values())) if counts else (0, 0)


Trainer = Callable[[Sequence[str], Path], dict]


def run_protocol(variants: Sequence[Variant], seeds: int, base: Sequence[str], out: Path, *,
                 deadline: float = math.inf, trainer: Trainer = train_run, clock: Callable[[], float] = time.time,
                 on_result: Callable[[ProtocolRun], None] = lambda run: None) -> ProtocolRun:
    """Every variant at seed 0, then every variant at seed 1, ... up to `seeds`; each run is
    `trainer(base + variant + seed overrides, out/<label>/seed<k>)`. A run starts only if it would end
    before `deadline`, judged by the same variant's previous run (seed 0's runs: if the deadline has not
    passed); the first that would not ends the protocol, so the runs done are a prefix of the order. A
    variant that refuses the model (StrategyError) is n/a once and not tried again; a failed run is
    recorded and the others go on. `on_result` sees the protocol after each run."""
    protocol = ProtocolRun()
    last_seconds: dict[str, float] = {}
    refused: set[str] = set()
    for seed in range(seeds):
        for variant in variants:
            if variant.label in refused:
                continue
            expected, left = last_seconds.get(variant.label, 0.0), deadline - clock()
            if left <= 0:
                protocol.stopped = f"the deadline passed before {variant.label} seed {seed}"
                return protocol
            if expected > left:
                protocol.stopped = (f"stopped before {variant.label} seed {seed}: its seed {seed - 1} run took "
                                    f"{expected:.0f} s and {left:.0f} s were left")
                return protocol
            overrides = [*base, *variant.overrides, f"seed={seed}", *(NOT_MEASURED if seed else ())]
            result = _attempt(trainer, variant.label, seed, overrides, out / variant.slug / f"seed{seed}", clock)
            last_seconds[variant.label] = result.seconds
            if result.status == "n/a":
                refused.add(variant.label)
            protocol.results.append(result)
            on_result(protocol)
    return protocol


def _attempt(trainer: Trainer, label: str, seed: int, overrides: list[str], path: Path, clock) -> RunResult:
    t0 = clock()
    try:
        summary = trainer(overrides, path)
    except StrategyError as e:
        return RunResult(label, seed, "n/a", None, str(e), clock() - t0)
    except Exception as e:  # any run's failure is a row of the table, not the end of the protocol
        return RunResult(label, seed, "failed", None, f"{type(e).__name__}: {e}", clock() - t0)
    status = "completed" if summary.get("status") == "completed" else "failed"
    return RunResult(label, seed, status, summary, summary.get("error"), clock() - t0)


# ---------------------------------------------------------------- the table: pure functions of the results


@dataclass(frozen=True)
class Row:
    label: str
    n: int  # completed runs with a test accuracy
    acc_mean: float | None
    acc_std: float | None  # sample standard deviation (n - 1); None for n < 2
    delta: float | None  # acc_mean less the reference's; None where either has n < 2
    delta_se: float | None  # sqrt(s^2/n + s_ref^2/n_ref)
    activation_ratio: float | None  # exact's activation bytes / this variant's, as its runs measured them
    img_s: float | None  # mean training throughput of the completed runs
    speed_vs_reference: float | None  # img_s / the reference's img_s
    note: str


def _accuracies(results: Sequence[RunResult]) -> list[float]:
    return [r.summary["test_acc"] for r in results if r.status == "completed" and r.summary.get("test_acc") is not None]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) >= 2 else None


def _note(results: Sequence[RunResult]) -> str:
    refused = [r for r in results if r.status == "n/a"]
    if refused:
        return f"n/a: {refused[0].error}"
    failed = [r for r in results if r.status == "failed"]
    if failed:
        return f"{len(failed)} of {len(results)} failed (seed {failed[0].seed}: {failed[0].error})"
    return "" if results else "not run (deadline)"


def summarize(results: Sequence[RunResult], labels: Sequence[str], reference: str = REFERENCE) -> list[Row]:
    """One row per label, in the order given, from the runs' summaries; figures a run lacks stay None."""
    by_label = {label: [r for r in results if r.label == label] for label in labels}
    ref_acc = _accuracies(by_label.get(reference, []))
    ref_img_s = _mean([r.summary["throughput_img_s"] for r in by_label.get(reference, [])
                       if r.status == "completed" and r.summary.get("throughput_img_s") is not None])
    rows = []
    for label, runs in by_label.items():
        acc = _accuracies(runs)
        img_s = _mean([r.summary["throughput_img_s"] for r in runs
                       if r.status == "completed" and r.summary.get("throughput_img_s") is not None])
        ratios = [r.summary["activation_ratio"] for r in runs if r.summary and r.summary.get("activation_ratio")]
        paired = label != reference and len(acc) >= 2 and len(ref_acc) >= 2
        rows.append(Row(
            label, len(acc), _mean(acc), _std(acc),
            _mean(acc) - _mean(ref_acc) if paired else None,
            math.sqrt(_std(acc) ** 2 / len(acc) + _std(ref_acc) ** 2 / len(ref_acc)) if paired else None,
            ratios[0] if ratios else None, img_s,
            img_s / ref_img_s if img_s is not None and ref_img_s else None, _note(runs)))
    return rows


def _plus_minus(value: float | None, spread: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) + ("" if spread is None else f" ± {spread:.2f}")


def table(rows: Sequence[Row], reference: str = REFERENCE) -> Table:
    """The protocol's markdown table."""
    t = Table("strategy", "n", "test acc % (mean ± std)", f"Δ vs {reference} (± s.e.)", "activation ratio",
              "img/s", f"throughput vs {reference}", "notes")
    for r in rows:
        delta = "reference" if r.label == reference else _plus_minus(r.delta, r.delta_se, "+.2f")
        t.add(r.label, r.n, _plus_minus(r.acc_mean, r.acc_std, ".2f"), delta, num(r.activation_ratio, ".2f"),
              num(r.img_s, ".0f"), num(r.speed_vs_reference, ".2f"), r.note)
    return t


def runs_table(results: Sequence[RunResult]) -> Table:
    """Every run, one row each, in the order they ran."""
    t = Table("strategy", "seed", "status", "test acc %", "activation ratio", "img/s", "seconds", "error")
    for r in results:
        s = r.summary or {}
        t.add(r.label, r.seed, r.status, num(s.get("test_acc"), ".2f"), num(s.get("activation_ratio"), ".2f"),
              num(s.get("throughput_img_s"), ".0f"), f"{r.seconds:.1f}", r.error or "")
    return t
