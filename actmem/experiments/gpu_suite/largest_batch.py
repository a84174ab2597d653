"""The largest batch of resnet50 (224x224, fp32, SGD with momentum) whose training step fits 16 GiB, for
exact and each conv strategy, by real trials (actmem.maxbatch.trials: ActNN's doubling then bisection,
two steps of a fresh model per trial, under torch.cuda.set_per_process_memory_fraction).

Big trials cost seconds each, so the search stops within 1/32 of the answer, the strategies after exact
start from exact's batch (they keep less, so they fit at least as many), each strategy gets its share
of the time left, and a trial that would end past that share is not started: such a row gives the
largest batch seen to fit and the smallest seen to fail. The dry run takes the toy Bottleneck net, a
tiny budget, and the torch reference of the compression kernels (the Triton interpreter would spend
minutes on kernels the other sections already check); its trials compare the measured step peak with
the budget, as nothing runs out of memory on the CPU."""
from __future__ import annotations

import os
import time

import torch

from actmem.core.errors import StrategyError
from actmem.experiments.gpu_suite import workload as wl
from actmem.experiments.gpu_suite.base import Context, Table, mib, register
from actmem.measure.batch_search import Job, Result, human, trials

BUDGET, DRY_BUDGET = 16 * 2**30, 256 * 2**10
TOLERANCE = 1 / 32


def find(w: wl.Workload, label: str, device: torch.device, budget: int, start: int, deadline: float) -> Result:
    job = Job(lambda: wl.build(w, label, device), wl.optimizer, (3, w.image, w.image), w.classes, device, label)
    return trials(job, budget, start=start, tolerance=TOLERANCE, deadline=deadline)


def cell(r: Result) -> str:
    if r.exact:
        return str(r.batch) if r.batch else "batch 1 does not fit"
    return f">= {r.batch}, < {r.failed}" if r.failed else f">= {r.batch} (time limit)"


@register("maxbatch", limit=40)
def maxbatch(ctx: Context) -> str:
    if ctx.dry_run:  # toy tensors: a second thread only adds synchronisation (5x slower on a busy machine)
        os.environ["ACTMEM_BACKEND"] = "reference"
        torch.set_num_threads(1)
    w = wl.plan(ctx.dry_run).conv
    budget = DRY_BUDGET if ctx.dry_run else BUDGET
    where = ("CPU; peak: the measured step peak" if ctx.dry_run
             else f"{torch.cuda.get_device_name()}; peak: the allocator's over the trial")
    head = (f"{w.name}, {w.image}x{w.image}, fp32, SGD with momentum; budget {human(budget)} ({where}); "
            f"doubling, then bisection to within 1/{round(1 / TOLERANCE)} of the batch.\n\n")
    table = Table("strategy", "max batch", "vs exact", "trials", "peak at max batch MiB", "seconds")
    labels = wl.CONV_LABELS
    exact, start = None, 1
    for i, label in enumerate(labels):
        t0 = time.monotonic()
        if ctx.left() <= 0:
            table.add(label, "not run (section time limit)", "-", 0, "-", "-")
            continue
        try:
            r = find(w, label, ctx.device, budget, start, t0 + ctx.left() / (len(labels) - i))
        except StrategyError as e:
            table.add(label, f"n/a: {e}", "-", "-", "-", "-")
            continue
        if label == "exact" and r.batch:
            exact = start = r.batch
        table.add(label, cell(r), f"{r.batch / exact:.2f}x" if r.batch and exact else "-", r.trials, mib(r.peak),
                  f"{time.monotonic() - t0:.1f}")
        ctx.progress(head + str(table))
    return head + str(table)
