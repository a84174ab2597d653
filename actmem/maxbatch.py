"""The largest batch whose training step fits a memory budget (issue 14):
`python -m actmem.maxbatch memory_budget=16GiB [train's config groups]`, or a `-m` sweep, one row per job.

On a GPU it is found by real trials, ActNN's way: under torch.cuda.set_per_process_memory_fraction, a
fresh model takes two steps (the first creates the optimizer state) at batches doubled from 1 until one
runs out of memory, then bisected between the last fit and the first failure. On the CPU nothing runs out
of memory, so it is estimated instead: the step peak (actmem.measure.step_peak) is affine in the batch
(piecewise: see `estimate`), so a least-squares line through a few small batches is solved for the
budget and, where affordable, confirmed by a measured step at the answer. On the CPU the compressed
layers' backward runs its big calls on chunks of the batch (strategies/ops.batch_chunks), whose buffers
stop growing once the batch spans a few chunks: fit at batches past that (`fit_batches=[16,32,64]` for
resnet50 at 224), or the line of small batches overstates the slope and the answer comes out low. The
input is synthetic, of the dataset's shape and class count: no data is read.
"""
from __future__ import annotations

import copy
import gc
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from pathlib import Path

import hydra
import torch
import torch.nn as nn
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from actmem import models, strategies
from actmem.config import Config, validate
from actmem.data.cifar import SPECS as CIFAR
from actmem.engine import Precision
from actmem.errors import ActmemError, ConfigError
from actmem.measure import step_peak, train_step
from actmem.optim import build_optimizer
from actmem.rundir import paragraph, write_json_atomic
from actmem.train import CONFIG_DIR, check_input, resolve_device

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
COLUMNS = ("dataset", "model", "strategy", "budget", "max batch", "found by", "step peak at max batch")
CONFIRM_TRIES = 3  # measured steps at most, in the CPU estimate's refinement


@dataclass
class MaxBatchConfig(Config):
    memory_budget: str = "16GiB"  # bytes, or with a unit: 12GB, 500MiB, 16GiB
    fit_batches: list[int] = field(default_factory=lambda: [2, 4, 8])  # CPU: the batches the line is fitted to
    confirm_below: str = "4GiB"  # CPU: confirm by a measured step where the predicted peak is below this (0: never)


ConfigStore.instance().store(name="maxbatch_schema", node=MaxBatchConfig)


def parse_bytes(value, key: str, allow_zero: bool = False) -> int:
    """'16GiB', '12GB', '500MiB' or a plain number of bytes -> bytes; ConfigError naming `key` otherwise."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", str(value).strip().lower())
    nbytes = int(float(m[1]) * UNITS[m[2] or "b"]) if m and (m[2] or "b") in UNITS else -1
    if nbytes > 0 or (allow_zero and nbytes == 0):
        return nbytes
    raise ConfigError(f"{key}={value!r} is not a memory size{'' if allow_zero else ' above zero'}. Give bytes with "
                      f"an optional unit, e.g. {key}=16GiB, 12GB, 500MiB or 1073741824 (KiB, MiB, GiB, TiB are "
                      "powers of 1024; KB, MB, GB, TB powers of 1000).")


def human(nbytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes:.0f} B"


# ---------------------------------------------------------------- the search, given an oracle

@dataclass
class Search:
    batch: int  # the largest batch seen to fit; 0: none did
    failed: int | None  # the smallest batch seen not to fit
    trials: list[tuple[int, bool]]  # (batch, fits), in the order tried

    @property
    def exact(self) -> bool:
        return self.failed == self.batch + 1


def search(fits: Callable[[int], bool], start: int = 1, tolerance: float = 0.0,
           stop: Callable[[int], bool] | None = None) -> Search:
    """The largest batch for which `fits` (monotone: true up to some batch, false above) holds: double from
    `start` until a batch fails (a failing start is bisected down from), then bisect between the last fit
    and the first failure until they are 1 (or `tolerance` of the fit) apart. `stop(batch)`, asked before
    each trial, ends the search early with what is known (a time limit)."""
    lo, hi, trials = 0, None, []
    n = start
    while not (stop and stop(n)):
        ok = fits(n)
        trials.append((n, ok))
        lo, hi = (n, hi) if ok else (lo, n)
        if hi is None:
            n *= 2
        elif hi - lo <= max(1, tolerance * lo):
            break
        else:
            n = (lo + hi) // 2
    return Search(lo, hi, trials)


# ---------------------------------------------------------------- one training step, on synthetic input

@dataclass(frozen=True)
class Job:
    """What a training step is made of; `name` says which in messages."""
    make_model: Callable[[], nn.Module]  # a fresh model, on the device, under its strategy
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    shape: tuple[int, ...]  # of one input
    classes: int
    device: torch.device
    name: str
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, *self.shape, device=self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.randint(self.classes, (n,), device=self.device)

    def peak(self, n: int) -> int:
        """The step peak of a fresh model at batch n, after a warm-up step that creates the optimizer state."""
        model = self.make_model()
        optimizer = self.make_optimizer(model)
        x, y = self.batch(n)
        train_step(model, (x, y), optimizer, autocast_dtype=self.autocast_dtype)
        return step_peak(model, (x, y), optimizer, autocast_dtype=self.autocast_dtype).bytes


@dataclass
class Result:
    batch: int  # 0: not even batch 1 fits
    peak: int | None  # bytes at that batch: measured (a trial, a confirmation) or, failing that, the fit's
    how: str
    failed: int | None = None  # the smallest batch seen not to fit, where trials found one
    exact: bool = True  # False: a trial search stopped early, the answer is between batch and failed
    trials: int = 0  # trial runs made (by `trials`)


# ---------------------------------------------------------------- GPU: trials

class Trials:
    """fits(n): a fresh model takes two steps at batch n without running out of memory (on the CPU, the
    suite's dry run, its measured step peak stays within the budget instead). Keeps each trial's peak."""

    def __init__(self, job: Job, budget: int):
        self.job, self.budget = job, budget
        self.peaks: dict[int, int | None] = {}  # None: out of memory
        self.seconds: dict[int, float] = {}

    def _run(self, n: int) -> int:
        job = self.job
        if job.device.type != "cuda":
            return job.peak(n)
        torch.cuda.reset_peak_memory_stats(job.device)
        model = job.make_model()
        optimizer = job.make_optimizer(model)
        x, y = job.batch(n)
        for _ in range(2):
            train_step(model, (x, y), optimizer, autocast_dtype=job.autocast_dtype)
        torch.cuda.synchronize(job.device)
        return torch.cuda.max_memory_allocated(job.device)

    def __call__(self, n: int) -> bool:
        t0 = time.monotonic()
        try:
            peak = self._run(n)
        except torch.OutOfMemoryError:
            peak = None
        # Outside the handler: its traceback, which holds the failed trial's tensors, is gone by now.
        gc.collect()
        if self.job.device.type == "cuda":
            torch.cuda.empty_cache()
        self.peaks[n], self.seconds[n] = peak, time.monotonic() - t0
        return peak is not None and peak <= self.budget

    def would_end_after(self, deadline: float, n: int) -> bool:
        """Whether a trial at n, timed by the largest trial that ran to its end (seconds per sample), would
        end after `deadline` (time.monotonic()); false while none has."""
        done = [m for m, peak in self.peaks.items() if peak is not None]
        return bool(done) and time.monotonic() + self.seconds[max(done)] * n / max(done) > deadline


def trials(job: Job, budget: int, *, start: int = 1, tolerance: float = 0.0, deadline: float | None = None,
           log: Callable[[str], None] | None = None) -> Result:
    """The max batch by trials (`search` over `Trials`), the allocator held to `budget` on a GPU; no trial
    is started that would end after `deadline` (time.monotonic())."""
    cuda = job.device.type == "cuda"
    oracle = Trials(job, budget)

    def fits(n: int) -> bool:
        ok = oracle(n)
        if log:
            log(f"batch {n}: " + (f"fits, peak {human(oracle.peaks[n])}" if ok else "does not fit"))
        return ok

    if cuda:
        index = torch.cuda.current_device() if job.device.index is None else job.device.index  # 'cuda' has none
        total = torch.cuda.get_device_properties(index).total_memory
        if budget > total:
            raise ConfigError(f"memory_budget={human(budget)} is more than the whole GPU "
                              f"({torch.cuda.get_device_name(index)}, {human(total)}); give at most that.")
        torch.backends.cudnn.benchmark = False  # autotuning every new batch size would cost more than the step
        torch.cuda.set_per_process_memory_fraction(budget / total, index)
    try:
        found = search(fits, start, tolerance, None if deadline is None else partial(oracle.would_end_after, deadline))
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
    where = torch.cuda.get_device_name(index) if cuda else "cpu (measured step peak against the budget)"
    how = f"trials on {where}: {len(found.trials)} of 2 steps"
    return Result(found.batch, oracle.peaks.get(found.batch), how, found.failed, found.exact, len(found.trials))


# ---------------------------------------------------------------- CPU: the step peak's affine fit

@dataclass(frozen=True)
class Fit:
    """peak = a + b * batch, least squares in exact arithmetic (an affine peak gives back its a and b)."""
    a: Fraction
    b: Fraction
    worst: float  # the largest relative residual over the points

    @classmethod
    def of(cls, points: list[tuple[int, int]]) -> Fit:
        k = len(points)
        mn, mp = Fraction(sum(n for n, _ in points), k), Fraction(sum(p for _, p in points), k)
        b = sum((n - mn) * (p - mp) for n, p in points) / sum((n - mn) ** 2 for n, _ in points)
        a = mp - b * mn
        return cls(a, b, max(float(abs(p - a - b * n) / p) for n, p in points))

    def at(self, n: int) -> int:
        return round(self.a + self.b * n)

    def solve(self, budget: int) -> int:
        """The largest batch whose predicted peak is within `budget`."""
        return math.floor((budget - self.a) / self.b)


def estimate(job: Job, budget: int, batches=(2, 4, 8), confirm_below: int = 4 * 2**30) -> Result:
    """The max batch from the step peak's affine fit at `batches`, then, where the predicted peak is below
    `confirm_below`, measured steps at the answer. The peak is the largest of several affine functions of
    the batch (one per moment of the step), so the line of small batches can be a few percent off at a
    large one: each measured step moves the answer along the secant through the two largest batches
    measured, until it lands on a batch already measured (at most CONFIRM_TRIES steps)."""
    points = {n: job.peak(n) for n in batches}
    fit = Fit.of(list(points.items()))
    n = fit.solve(budget)
    how = (f"estimate from the step peak's affine fit at batches {','.join(map(str, batches))} "
           f"(worst residual {fit.worst:.1%}), not a trial")
    if n < 1 or fit.at(n) > confirm_below:
        return Result(max(n, 0), fit.at(n), how + ("" if n < 1 else "; predicted peak, not measured"))
    measured: dict[int, int] = {}
    while n >= 1 and n not in measured and len(measured) < CONFIRM_TRIES:
        measured[n] = points[n] = job.peak(n)
        n = Fit.of(sorted(points.items())[-2:]).solve(budget)
    trail = ", then ".join(f"{human(p)} at {m}" for m, p in measured.items())
    if measured.get(n, budget + 1) <= budget:
        return Result(n, measured[n], f"{how}; confirmed: measured {trail}")
    fitting = [m for m, p in measured.items() if p <= budget]
    best = max(fitting) if fitting else max(n, 0)
    return Result(best, measured.get(best), f"{how}; measured {trail}; the line's answer, {n}, not measured")


def too_small(job: Job, budget: int) -> ConfigError:
    """The refusal of a budget below batch 1, with what batch 1 needs (one measured step)."""
    need = job.peak(1)
    gpu = " (more on a GPU, whose allocator rounds up and caches, and where cuDNN takes workspace)"
    return ConfigError(f"memory_budget={human(budget)} is too small for a single sample: a training step of "
                       f"{job.name} at batch 1 needs {human(need)} (its measured step peak: parameters, gradients, "
                       f"optimizer state and activations). Give memory_budget={math.ceil(need / 2**20)}MiB or more"
                       f"{gpu if job.device.type == 'cuda' else ''}.")


# ---------------------------------------------------------------- the command line

def input_spec(cfg) -> tuple[tuple[int, int, int], int]:
    """(C, H, W) and class count of the dataset of `cfg`, from the config alone: ImageNet has 1000 classes
    (a subset such as Imagenette fewer; the head is a small part of the step's memory)."""
    if cfg.name == "synthetic":
        shape, classes = (cfg.channels, cfg.image_size, cfg.image_size), cfg.num_classes
    elif cfg.name in CIFAR:
        shape, classes = (3, 32, 32), CIFAR[cfg.name].num_classes
    elif cfg.name == "imagenet":
        shape, classes = (3, cfg.image_size, cfg.image_size), 1000
    else:
        raise ConfigError(f"dataset={cfg.name}: actmem.maxbatch does not know its input shape; use "
                          "dataset=synthetic with dataset.image_size, dataset.channels and dataset.num_classes.")
    if min(*shape, classes) < 1:
        raise ConfigError(f"dataset={cfg.name} gives {shape[0]}x{shape[1]}x{shape[2]} images of {classes} classes; "
                          "each must be a positive integer.")
    return shape, classes


def strategy_label(cfg) -> str:
    """The strategy's name and its width: 'actnn L3', 'blpa bits=4', 'division bits=2', 'exact'."""
    parts = [cfg.name, cfg.get("level")]
    if cfg.get("bits") is not None:
        parts.append(f"bits={cfg.bits:g}")
    return " ".join(p for p in parts if p)


def build_job(cfg: DictConfig, strategy: DictConfig) -> Job:
    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    shape, classes = input_spec(cfg.dataset)
    check_input(cfg.model.name, shape, cfg.dataset.name)
    precision = Precision.build(cfg.trainer.amp, device, cfg.trainer.channels_last)
    torch.manual_seed(cfg.seed)
    initial = models.build(cfg.model.name, num_classes=classes, **cfg.model.kwargs)

    def make_model() -> nn.Module:
        model = copy.deepcopy(initial).to(device)
        if precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return strategies.apply(model, strategy)

    return Job(make_model, lambda model: build_optimizer(model, cfg.optim), shape, classes, device,
               f"model={cfg.model.name} under strategy={strategy_label(strategy)}", precision.dtype,
               precision.channels_last)


def run(cfg: DictConfig) -> dict:
    """The row of one run, as a dict (COLUMNS and the details)."""
    validate(cfg)
    budget = parse_bytes(cfg.memory_budget, "memory_budget")
    confirm_below = parse_bytes(cfg.confirm_below, "confirm_below", allow_zero=True)
    batches = sorted(set(cfg.fit_batches))
    if len(batches) < 2 or batches[0] < 1:
        raise ConfigError(f"fit_batches={list(cfg.fit_batches)}: the line needs at least two different positive "
                          "batches, e.g. fit_batches=[2,4,8].")
    strategy = strategies.resolve(cfg.strategy)
    job = build_job(cfg, strategy)
    if job.device.type == "cuda":
        result = trials(job, budget, log=lambda line: print(line, file=sys.stderr, flush=True))
    else:
        result = estimate(job, budget, batches, confirm_below)
    if result.batch < 1:
        raise too_small(job, budget)
    return {"dataset": cfg.dataset.name, "model": cfg.model.name, "strategy": strategy_label(strategy),
            "budget": human(budget), "max batch": result.batch, "found by": result.how,
            "step peak at max batch": human(result.peak) if result.peak is not None else "-",
            "budget_bytes": budget, "peak_bytes": result.peak, "device": str(job.device),
            "config": OmegaConf.to_container(cfg, resolve=True)}


@hydra.main(config_path=CONFIG_DIR, config_name="maxbatch", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        row = run(cfg)
    except ActmemError as e:
        if cfg.debug:
            raise
        print(paragraph(f"Error: {e}"), file=sys.stderr)
        sys.exit(2)
    hydra_cfg = HydraConfig.get()
    if OmegaConf.select(hydra_cfg, "job.num", default=0) == 0:  # the first job of a sweep, or a single run
        print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    print("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |", flush=True)
    write_json_atomic(Path(hydra_cfg.runtime.output_dir) / "maxbatch.json", row)


if __name__ == "__main__":
    main()
