"""Finding the largest batch whose training step fits a memory budget, for any model and optimizer
(`Job`): on a GPU by real trials (`trials`, ActNN's way: under torch.cuda.set_per_process_memory_fraction,
a fresh model takes two steps at batches doubled from 1 until one runs out of memory, then bisected); on
the CPU, where nothing runs out of memory, by an estimate (`estimate`): the step peak
(actmem.measure.step_peak) is affine in the batch, so a least-squares line through a few small batches is
solved for the budget and, where affordable, confirmed by measured steps that climb to the answer, none of
them at a batch whose step could exceed the budget. Each trial is logged (batch, measured peak, seconds);
none starts that would end past its time limit. `python -m actmem.maxbatch` is the command line.
"""
from __future__ import annotations

import gc
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

import torch
import torch.nn as nn

from actmem.core.errors import ConfigError, paragraph
from actmem.measure import step_peak, train_step
from actmem.measure.memtrack import Peak

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


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

    def peak(self, n: int) -> Peak:
        """The step peak of a fresh model at batch n, after a warm-up step that creates the optimizer state."""
        model = self.make_model()
        optimizer = self.make_optimizer(model)
        x, y = self.batch(n)
        train_step(model, (x, y), optimizer, autocast_dtype=self.autocast_dtype)
        return step_peak(model, (x, y), optimizer, autocast_dtype=self.autocast_dtype)


@dataclass
class Result:
    batch: int  # 0: not even batch 1 fits
    peak: int | None  # bytes at that batch: measured (a trial, a confirmation) or, failing that, the fit's;
    # for batch 0, batch 1's where it was measured
    how: str
    failed: int | None = None  # the smallest batch seen not to fit, where trials found one
    exact: bool = True  # False: a trial search stopped early, the answer is between batch and failed
    trials: int = 0  # trial runs made (by `trials`)


# ---------------------------------------------------------------- GPU: trials

def progress(n: int, peak: int | None, budget: int, seconds: float) -> str:
    """A trial's line on stderr: a search that takes minutes shows where it is."""
    fits = peak is not None and peak <= budget
    measured = "out of memory" if peak is None else f"peak {human(peak)}"
    return f"batch {n}: {'fits' if fits else 'does not fit'} ({measured}), {seconds:.1f} s"


class Trials:
    """fits(n): a fresh model takes two steps at batch n without running out of memory (on the CPU, the
    suite's dry run, its measured step peak stays within the budget instead). Keeps each trial's peak and
    time, and logs each trial's `progress` line."""

    def __init__(self, job: Job, budget: int, log: Callable[[str], None] = lambda line: None):
        self.job, self.budget, self.log = job, budget, log
        self.peaks: dict[int, int | None] = {}  # None: out of memory
        self.seconds: dict[int, float] = {}

    def _run(self, n: int) -> int:
        job = self.job
        if job.device.type != "cuda":
            return job.peak(n).bytes
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
        self.log(progress(n, peak, self.budget, self.seconds[n]))
        return peak is not None and peak <= self.budget

    def fitting(self) -> int:
        """The largest batch measured to fit; 0: none."""
        return max((n for n, peak in self.peaks.items() if peak is not None and peak <= self.budget), default=0)

    def duration(self, n: int) -> float:
        """Seconds a trial at n would take, timed by the largest trial that ran to its end (seconds per
        sample: an overestimate, as part of a trial's time does not grow with the batch); 0 while none has."""
        done = [m for m, peak in self.peaks.items() if peak is not None]
        return self.seconds[max(done)] * n / max(done) if done else 0.0

    def would_end_after(self, deadline: float, n: int) -> bool:
        """Whether a trial at n (`duration`) would end after `deadline` (time.monotonic()); false while
        no trial has ended."""
        seconds = self.duration(n)
        return seconds > 0 and time.monotonic() + seconds > deadline


def trials(job: Job, budget: int, *, start: int = 1, tolerance: float = 0.0, deadline: float | None = None,
           log: Callable[[str], None] = lambda line: None) -> Result:
    """The max batch by trials (`search` over `Trials`), the allocator held to `budget` on a GPU; no trial
    is started that would end after `deadline` (time.monotonic())."""
    cuda = job.device.type == "cuda"
    oracle = Trials(job, budget, log)
    if cuda:
        index = torch.cuda.current_device() if job.device.index is None else job.device.index  # 'cuda' has none
        total = torch.cuda.get_device_properties(index).total_memory
        if budget > total:
            raise ConfigError(f"memory_budget={human(budget)} is more than the whole GPU "
                              f"({torch.cuda.get_device_name(index)}, {human(total)}); give at most that.")
        torch.backends.cudnn.benchmark = False  # autotuning every new batch size would cost more than the step
        torch.cuda.set_per_process_memory_fraction(budget / total, index)
    try:
        stop = None if deadline is None else partial(oracle.would_end_after, deadline)
        found = search(oracle, start, tolerance, stop)
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
    where = torch.cuda.get_device_name(index) if cuda else "cpu (measured step peak against the budget)"
    how = f"trials on {where}: {len(found.trials)} of 2 steps"
    return Result(found.batch, oracle.peaks.get(found.batch), how, found.failed, found.exact, len(found.trials))


# ---------------------------------------------------------------- CPU: the step peak's affine fit

class Steps(Trials):
    """The estimate's measurements: the tracked step peak (`Job.peak`, on any device) against the budget,
    and what they bound of the steps not measured."""

    fixed = 0  # bytes every moment of the step holds, whatever the batch: parameters, buffers, optimizer state

    def _run(self, n: int) -> int:
        peak = self.job.peak(n)
        self.fixed = peak.breakdown["params"] + peak.breakdown["optimizer"]
        return peak.bytes

    def ceiling(self, n: int) -> float:
        """The most the step peak at n can be, n above the largest batch measured to fit, m. The step peak is
        the largest of the live bytes of its moments, each concave and non-decreasing in the batch (affine,
        or flat where a chunked buffer stops growing) and at least `fixed` at batch 0, so above m it grows
        at most (peak(m) - fixed) / m a sample."""
        m = self.fitting()
        return self.fixed + (self.peaks[m] - self.fixed) * n / m

    def reach(self) -> int:
        """The largest batch whose `ceiling` is within the budget; 0 while nothing measured fits."""
        m = self.fitting()
        return m and math.floor(m * (self.budget - self.fixed) / (self.peaks[m] - self.fixed))


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


def estimate(job: Job, budget: int, batches=(2, 4, 8), confirm_below: int = 4 * 2**30,
             time_limit: float = math.inf, log: Callable[[str], None] = lambda line: None) -> Result:
    """The max batch from the step peak's affine fit at `batches`, then, where the predicted peak is below
    `confirm_below`, measured steps up to the answer. The peak is the largest of several affine functions
    of the batch (one per moment of the step), so the line of small batches can be far off at a large one
    (where the optimizer's moment, flat in the batch, holds the small batches' peak): each step is taken
    at the answer of the line through the two largest batches measured, or, where a step there could
    exceed the budget, at the largest batch that cannot (`Steps.reach`), until the line lands on a batch
    measured to fit. `batches` are measured as given, up to the first that does not fit (nothing bounds
    them: keep them small); no later step starts that could exceed the budget, nor any that would end past
    `time_limit` seconds. Where one is needed, the answer is the largest batch measured to fit, and a
    paragraph logged says what measuring the line's answer would take."""
    deadline = time.monotonic() + time_limit
    steps = Steps(job, budget, log)
    for n in batches:
        if steps.peaks and steps.fitting() < max(steps.peaks):
            break  # a smaller batch does not fit: neither would this one
        if steps.would_end_after(deadline, n):
            raise ConfigError(f"fit_batches={list(batches)}: the step at batch {n} would take about "
                              f"{steps.duration(n):.0f} s and end past time_limit={time_limit:g} s. Give smaller "
                              f"fit_batches or a larger time_limit, e.g. time_limit={math.ceil(2 * time_limit)}.")
        steps(n)
    if not steps.fitting() and 1 not in steps.peaks:
        steps(1)  # the smallest of fit_batches does not fit: the line goes through batch 1 instead
    if not steps.fitting():
        return Result(0, steps.peaks[1], "batch 1 measured: it does not fit")
    fit = Fit.of(sorted(steps.peaks.items()))
    how = (f"estimate from the step peak's affine fit at batches {','.join(map(str, sorted(steps.peaks)))} "
           f"(worst residual {fit.worst:.1%}), not a trial")
    n = fit.solve(budget)
    if n < 1 or fit.at(n) > confirm_below:
        return Result(max(n, 0), steps.peaks.get(1) if n < 1 else fit.at(n),
                      how + ("" if n < 1 else "; predicted peak, not measured"))
    measured = []
    while n > steps.fitting() and n not in steps.peaks:
        step = min(n, steps.reach())
        if step <= steps.fitting() or steps.would_end_after(deadline, step):
            break
        steps(step)
        measured.append(step)
        fit = Fit.of(sorted(steps.peaks.items())[-2:])
        n = fit.solve(budget)
    trail = ", then ".join(f"{human(steps.peaks[m])} at {m}" for m in measured or [steps.fitting()])
    best = steps.fitting()
    if n == best:
        how += f"; confirmed: measured {trail}"
    elif n < best or n in steps.peaks:
        how += f"; measured {trail}"
    else:
        log(paragraph(unmeasured(steps, n, fit.at(n), step, time_limit)))
        how += (f"; measured {trail}; the line's answer, {n}, not measured (the next step "
                + ("could exceed memory_budget)" if step <= best else "would end past time_limit)"))
    return Result(best, steps.peaks[best], how)


def unmeasured(steps: Steps, n: int, predicted: int, step: int, time_limit: float) -> str:
    """Why the estimate stopped below the line's answer `n` (the next step, at `step`, could exceed the
    budget or would end too late), and what measuring it would take."""
    best = steps.fitting()
    head = (f"Note: the max batch given, {best}, is the largest measured to fit ({human(steps.peaks[best])}); "
            f"the line through the largest batches measured puts it at {n} (predicted step peak "
            f"{human(predicted)}), not measured.")
    if step <= best:
        return (f"{head} A step at batch {best + 1} could already need {human(steps.ceiling(best + 1))}, more "
                f"than memory_budget={human(steps.budget)}, so none is measured: the max batch is between "
                f"{best} and {n}.")
    return (f"{head} The next step, at batch {step}, would take about {steps.duration(step):.0f} s and end past "
            f"time_limit={time_limit:g} s; a trial at batch {n} takes about {steps.duration(n):.0f} s, its "
            f"step peak at most {human(steps.ceiling(n))}. Give time_limit={math.ceil(2 * time_limit)} or more to "
            f"measure up to it, or confirm_below=0 for the line's answer without measured steps.")


def too_small(job: Job, budget: int, need: int | None) -> ConfigError:
    """The refusal of a budget below batch 1, with what batch 1 needs (`need`, or one measured step)."""
    need = job.peak(1).bytes if need is None else need
    gpu = " (more on a GPU, whose allocator rounds up and caches, and where cuDNN takes workspace)"
    return ConfigError(f"memory_budget={human(budget)} is too small for a single sample: a training step of "
                       f"{job.name} at batch 1 needs {human(need)} (its measured step peak: parameters, gradients, "
                       f"optimizer state and activations). Give memory_budget={math.ceil(need / 2**20)}MiB or more"
                       f"{gpu if job.device.type == 'cuda' else ''}.")
