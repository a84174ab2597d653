"""Effective bandwidth of every codec kernel, (bytes read + bytes written) / time, against a torch copy
(`dst.copy_(src)`) of the same input measured in the same run. Target (issue 4): every codec kernel
>= 60 % of copy bandwidth, goal 80 %.

Timed through the public compress API (what a strategy calls, allocation of the result included) with
CUDA events around each call, the L2 cache flushed before each: the median of 20 calls after 3.
The bytes are those the codec must move: its input once and its output (codes and metadata) once.
quantize runs without its NaN check (a reduction and a host sync, not the kernel); split_quantize
always checks its statistics, so its time includes that small reduction and sync."""
from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

from actmem import compress
from actmem.compress import grid, index, split
from actmem.compress.triton_activation import value_and_derivative
from actmem.experiments.gpu_suite.base import Context, Table, register

TARGET, GOAL = 0.60, 0.80
PLANE = 56  # inputs are [N, C, 56, 56] activations (DIVISION pools 56x56 planes in 8x8 blocks)
FLUSH_BYTES = 256 * 2**20  # more than any GPU's L2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type != "cuda":  # dry run
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()  # evicts the input from L2, and keeps the GPU busy while the call is issued
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


def activation(nbytes: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """About nbytes of [N, C, 56, 56] activations (C up to 64), standard normal."""
    planes = max(1, nbytes // (PLANE * PLANE * dtype.itemsize))
    channels = min(64, planes)
    g = torch.Generator(device).manual_seed(0)
    return torch.randn(planes // channels, channels, PLANE, PLANE, generator=g, device=device).to(dtype)


def codecs(x: torch.Tensor) -> list[tuple[str, Callable[[], object], int]]:
    """(name, call, bytes moved) of every codec kernel on x."""
    C, nx = x.shape[1], x.numel() * x.element_size()
    ones, zeros = torch.ones(C, device=x.device), torch.zeros(C, device=x.device)
    borders = torch.linspace(-2, 2, 7, device=x.device)  # few-bit 3-bit: 7 inner borders, 8 levels
    levels = torch.linspace(0, 1, 8, device=x.device)
    grad = torch.randn_like(x)
    q = compress.quantize(x, 2, seed=0)
    s = split.split_quantize(x, 8, 2, seed=0)
    g = grid.grid_quantize(x, ones, zeros, 4)
    b = index.bucketize_pack(x, borders, 3)
    return [
        ("quantize (2-bit, stochastic)", lambda: compress.quantize(x, 2, seed=0, check=False), nx + q.nbytes),
        ("dequantize (2-bit)", lambda: compress.dequantize(q), q.nbytes + nx),
        ("split_quantize (DIVISION B=8, Q=2)", lambda: split.split_quantize(x, 8, 2, seed=0), nx + s.nbytes),
        ("split_dequantize", lambda: split.split_dequantize(s), s.nbytes + nx),
        ("grid_quantize (BLPA 4-bit)", lambda: grid.grid_quantize(x, ones, zeros, 4), nx + g.nbytes),
        ("grid_dequantize", lambda: grid.grid_dequantize(g), g.nbytes + nx),
        ("bucketize_pack (fewbit 3-bit)", lambda: index.bucketize_pack(x, borders, 3), nx + b.nbytes),
        ("lookup_mul (fewbit 3-bit)", lambda: index.lookup_mul(b, levels, grad), b.nbytes + 2 * nx),
        ("value_and_derivative (gelu)", lambda: value_and_derivative(x, "gelu"), 3 * nx),
    ]


@register("kernels", limit=60)
def kernels(ctx: Context) -> str:
    device = ctx.device
    sizes = (2**16,) if ctx.dry_run else (64 * 2**20, 256 * 2**20)
    warmup, reps = (1, 1) if ctx.dry_run else (3, 20)
    table = Table("codec", "dtype", "input MiB", "ms", "GB/s", "copy GB/s", "% of copy", f">= {TARGET:.0%}")
    fractions = []  # (fraction of copy bandwidth, which)
    skipped = []
    for nbytes in sizes:
        for dname, dtype in DTYPES.items():
            if ctx.left() <= 0:
                skipped.append(f"{dname} {nbytes / 2**20:g} MiB")
                continue
            x = activation(nbytes, dtype, device)
            nx = x.numel() * x.element_size()
            copy = 2 * nx / median_seconds(functools.partial(torch.empty_like(x).copy_, x), device, warmup, reps)
            for name, call, moved in codecs(x):
                seconds = median_seconds(call, device, warmup, reps)
                fraction = moved / seconds / copy
                table.add(name, dname, f"{nx / 2**20:.2f}", f"{seconds * 1e3:.3f}", f"{moved / seconds / 1e9:.1f}",
                          f"{copy / 1e9:.1f}", f"{fraction:.0%}", "met" if fraction >= TARGET else "not met")
                fractions.append((fraction, f"{name}, {dname}, {nx / 2**20:.0f} MiB"))
            ctx.progress(str(table))
    lines = [str(table), ""]
    if fractions:
        slowest, which = min(fractions)
        lines.append(f"Every codec kernel >= {TARGET:.0%} of copy bandwidth: {_verdict(slowest >= TARGET)}; "
                     f"goal >= {GOAL:.0%}: {_verdict(slowest >= GOAL)} (slowest: {which} at {slowest:.0%}).")
    if skipped:
        lines.append(f"Not measured (section time limit): {', '.join(skipped)}.")
    return "\n".join(lines) + "\n"


def _verdict(met: bool) -> str:
    return "met" if met else "not met"
