"""Training on the GPU, every strategy against exact: allocator peak, bytes kept for backward, img/s,
and throughput relative to exact measured interleaved in one process (round-robin steps across the
strategies of a setting, median step time), so that clock and thermal drift hit them alike.

The peaks are each strategy's own (see warm_up): its model goes to the GPU and takes its warm-up steps
with only earlier strategies' parameters and optimizer state resident, and what was allocated
(reserved) before is subtracted; parameters, gradients and momentum count, the input batch does not.

Targets (issue 11): ActNN L3 and DIVISION at resnet50 batch 64 reach >= 0.80 of exact's throughput;
forward_ad is faster than recomputation at equal memory (recompute σ->f2)."""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field

import torch

from actmem.core.errors import StrategyError
from actmem.experiments.gpu_suite import workload as wl
from actmem.experiments.gpu_suite.base import Context, Table, mib, num, register
from actmem.measure import activation_bytes, train_step

THROUGHPUT_TARGET = 0.80


@dataclass
class Run:
    note: str = ""  # "n/a: <why>" or "OOM" where there are no figures
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    kept: int | None = None  # activation bytes
    times: list[float] = field(default_factory=list)

    def median(self) -> float | None:
        return statistics.median(self.times) if self.times and not self.note else None


@dataclass(frozen=True)
class Setting:
    workload: wl.Workload
    labels: tuple[str, ...]
    batch: int
    dtype: str  # key of wl.DTYPES

    def __str__(self) -> str:
        return f"{self.workload.name} b{self.batch} {self.dtype}"


def settings(plan: wl.Plan) -> list[Setting]:
    """In order of importance: the target batch first, so a run cut short still has it."""
    conv = [Setting(plan.conv, wl.CONV_LABELS, b, d) for b in plan.conv_batches for d in plan.dtypes]
    first = len(plan.dtypes)
    return conv[:first] + [Setting(plan.vit, wl.VIT_LABELS, plan.vit_batch, d) for d in plan.dtypes] + conv[first:]


def measure(s: Setting, plan: wl.Plan, device: torch.device, seconds: float) -> dict[str, Run]:
    """Every strategy of the setting: warm-up and peaks one by one, then timed rounds interleaved until
    max_rounds, or min_rounds once `seconds` have passed."""
    t0 = time.monotonic()
    dtype = wl.DTYPES[s.dtype]
    x, y = wl.batch(s.workload, s.batch, device)
    runs: dict[str, Run] = {}
    live = {}  # label: (model, optimizer), the strategies still running
    for label in s.labels:
        _free(device)  # the previous strategy's cache (and an OOM'd strategy's tensors) go back first
        before = _memory(device)
        try:
            model = wl.build(s.workload, label, device)
        except StrategyError as e:
            runs[label] = Run(note=f"n/a: {e}")
            continue
        opt = wl.optimizer(model)
        try:
            runs[label] = warm_up(model, opt, x, y, dtype, plan.warmup, before)
            live[label] = (model, opt)
        except torch.cuda.OutOfMemoryError:
            runs[label] = Run(note="OOM")
        del model, opt
    for rounds in range(plan.max_rounds):
        if rounds >= plan.min_rounds and time.monotonic() - t0 > seconds:
            break
        for label, (model, opt) in list(live.items()):
            try:
                wl.sync(device)
                t = time.perf_counter()
                train_step(model, (x, y), opt, autocast_dtype=dtype)
                wl.sync(device)
                runs[label].times.append(time.perf_counter() - t)
            except torch.cuda.OutOfMemoryError:
                runs[label].note = "OOM"
            if runs[label].note:
                del live[label]
                _free(device)
    return runs


def warm_up(model, opt, x, y, dtype, steps: int, before: tuple[int, int]) -> Run:
    """The untimed steps and this strategy's own allocator peaks: over the steps after the first (whose
    compilation and cuDNN autotuning, with its trial workspaces, would inflate them), less what was
    allocated and reserved `before` its model moved to the device. Also its activation bytes."""
    run = Run()
    cuda = x.device.type == "cuda"
    train_step(model, (x, y), opt, autocast_dtype=dtype)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(x.device)
    for _ in range(steps - 1):
        train_step(model, (x, y), opt, autocast_dtype=dtype)
    if cuda:
        run.peak_allocated = torch.cuda.max_memory_allocated(x.device) - before[0]
        run.peak_reserved = torch.cuda.max_memory_reserved(x.device) - before[1]
    run.kept = activation_bytes(model, x, autocast_dtype=dtype)
    return run


def _memory(device: torch.device) -> tuple[int, int]:
    """(allocated, reserved) bytes now; (0, 0) off the GPU."""
    if device.type != "cuda":
        return 0, 0
    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def throughput_table(results: dict[Setting, dict[str, Run]]) -> Table:
    table = Table("model", "batch", "autocast", "strategy", "peak allocated MiB", "peak reserved MiB",
                  "kept for backward MiB", "img/s", "vs exact", "steps timed")
    for s, runs in results.items():
        exact = runs.get("exact", Run()).median()
        for label, run in runs.items():
            med = run.median()
            rate = num(s.batch / med) if med else run.note or "-"
            ratio = num(exact / med, ".2f") if med and exact else "-"
            table.add(s.workload.name, s.batch, s.dtype, label, mib(run.peak_allocated), mib(run.peak_reserved),
                      mib(run.kept), rate, ratio, len(run.times))
    return table


def targets_table(results: dict[Setting, dict[str, Run]], plan: wl.Plan) -> Table:
    table = Table("target", "setting", "measured", "")
    for s, runs in results.items():
        exact = runs["exact"].median() if "exact" in runs else None
        if s.workload is plan.conv and s.batch == plan.conv_batches[0]:
            for label in ("actnn L3", "division"):
                med = runs[label].median() if label in runs else None
                ratio = exact / med if med and exact else None
                table.add(f"{label} >= {THROUGHPUT_TARGET:.2f}x exact's throughput", s,
                          f"{ratio:.2f}x" if ratio else runs.get(label, Run("not run")).note or "-",
                          _verdict(ratio is not None and ratio >= THROUGHPUT_TARGET, ratio is None))
        if s.workload is plan.vit:
            fad, rec = runs.get("forward_ad", Run("not run")), runs.get(wl.RECOMPUTE, Run("not run"))
            speed = rec.median() / fad.median() if fad.median() and rec.median() else None
            kept = f"; kept {mib(fad.kept)} vs {mib(rec.kept)} MiB" if fad.kept and rec.kept else ""
            table.add(f"forward_ad faster than {wl.RECOMPUTE} (equal memory)", s,
                      (f"{speed:.2f}x its speed" if speed else fad.note or rec.note or "-") + kept,
                      _verdict(speed is not None and speed > 1, speed is None))
    return table


def _verdict(met: bool, missing: bool) -> str:
    return "not measured" if missing else "met" if met else "not met"


def markdown(results, plan: wl.Plan, skipped: list[Setting]) -> str:
    parts = [str(throughput_table(results)), "", "Targets:", "", str(targets_table(results, plan))]
    if skipped:
        parts += ["", "Not run (section time limit): " + ", ".join(map(str, skipped)) + "."]
    return "\n".join(parts)


@register("training", limit=160)
def training(ctx: Context) -> str:
    plan = wl.plan(ctx.dry_run)
    torch.backends.cudnn.benchmark = True  # as actmem.train does; the warm-up steps absorb the autotuning
    todo = settings(plan)
    results: dict[Setting, dict[str, Run]] = {}
    for i, s in enumerate(todo):
        share = ctx.left() / (len(todo) - i)
        if share <= 0:
            return markdown(results, plan, todo[i:])
        results[s] = measure(s, plan, ctx.device, share)
        _free(ctx.device)
        ctx.progress(markdown(results, plan, []))
    return markdown(results, plan, [])
