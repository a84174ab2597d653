"""Where a training step's GPU time goes: one profiled step per strategy (torch.profiler, CUDA
activity) after warm-up, on resnet50 and, for the nonlinearity strategies, vit_tiny: the step's CUDA
time (every kernel, memcpy and memset), the share of it in actmem's Triton kernels, and the slowest
of those by name (its time summed over its calls)."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from actmem.compress.launch import kernel_names
from actmem.core.errors import StrategyError
from actmem.experiments.gpu_suite import workload as wl
from actmem.experiments.gpu_suite.base import Context, Table, register
from actmem.measure import train_step

VIT_LABELS = ("exact", "fewbit 3", "forward_ad", "combo")


def device_times(events, names: set[str]) -> tuple[float, dict[str, tuple[float, int]]]:
    """(CUDA time of all device events, {actmem kernel: (time, calls)}), in microseconds."""
    total, ours = 0.0, defaultdict(lambda: (0.0, 0))
    for e in events:
        if e.device_type != DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()
        total += us
        if e.name in names:
            t, calls = ours[e.name]
            ours[e.name] = (t + us, calls + 1)
    return total, dict(ours)


def profiled_step(w: wl.Workload, label: str, batch: int, warmup: int, device: torch.device):
    model = wl.build(w, label, device)
    opt = wl.optimizer(model)
    x, y = wl.batch(w, batch, device)
    for _ in range(warmup):
        train_step(model, (x, y), opt)
    wl.sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(model, (x, y), opt)
        wl.sync(device)
    return prof.events()


@register("profile", limit=70)
def profile_section(ctx: Context) -> str:
    plan = wl.plan(ctx.dry_run)
    torch.backends.cudnn.benchmark = True  # as in training (the warm-up steps absorb the autotuning)
    names = kernel_names()
    table = Table("model", "batch", "strategy", "step CUDA ms", "actmem kernels ms", "actmem share",
                  "slowest actmem kernel", "its ms (calls)")
    cases = [(plan.conv, plan.conv_batches[0], wl.CONV_LABELS), (plan.vit, plan.vit_batch, VIT_LABELS)]
    for w, batch, labels in cases:
        for label in labels:
            if ctx.left() <= 0:
                table.add(w.name, batch, label, "not run (section time limit)", "", "", "", "")
                continue
            try:
                events = profiled_step(w, label, batch, plan.warmup, ctx.device)
            except StrategyError as e:
                table.add(w.name, batch, label, f"n/a: {e}", "", "", "", "")
                continue
            total, ours = device_times(events, names)
            if not total:  # no CUDA activity: the CPU dry run
                table.add(w.name, batch, label, "-", "-", "-", "-", "-")
            else:
                mine = sum(t for t, _ in ours.values())
                slowest = max(ours, key=lambda k: ours[k][0], default=None)
                table.add(w.name, batch, label, f"{total / 1e3:.2f}", f"{mine / 1e3:.2f}", f"{mine / total:.0%}",
                          slowest or "-", f"{ours[slowest][0] / 1e3:.2f} ({ours[slowest][1]})" if slowest else "-")
            ctx.progress(str(table))
    note = "fp32, one training step (forward, backward, SGD) after warm-up; times are the kernels' own durations."
    return f"{table}\n\n{note}\n"
