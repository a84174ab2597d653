"""Training throughput of every registered strategy relative to exact, at equal batch, in one run.

    python scripts/bench_strategies.py                          # CPU: resnet20 and vit_tiny, batch 128
    python scripts/bench_strategies.py --device cuda --batch 256
    python scripts/bench_strategies.py --models vit_tiny --strategies exact forward_ad checkpoint

The conv-net strategies run on resnet20, the nonlinearity ones (fewbit, forward_ad, combo = fewbit +
actnn) on vit_tiny; exact and checkpoint on both. On vit_tiny, "recompute σ->f2" is recomputation at
forward_ad's granularity (each pair forward_ad fuses, checkpointed: the same bytes kept, but f2's
forward runs again in backward) -- the comparison of the forward-AD paper. One training step = forward, cross-entropy,
backward, SGD step, on a fixed random CIFAR-shaped batch. Steps are interleaved round-robin across a
model's strategies, so that a slow-down of the machine hits them alike, and each strategy's figure is
its median step. On CUDA the table adds peak memory, and the fused forward-AD kernel (σ and σ' in one
pass) is timed: bytes moved (read x, write σ(x) and σ'(x)) per second. Prints markdown.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
import torch.nn.functional as F

from actmem import models, strategies
from actmem.core.errors import StrategyError
from actmem.core.provenance import command_line, device_name, header
from actmem.experiments.gpu_suite.workload import recompute_pairs
from actmem.measure import activation_bytes

RECOMPUTE = "recompute σ->f2"

NONLINEAR = ("fewbit", "forward_ad", "combo")
MB = 2**20


def groups() -> dict[str, list[str]]:
    names = strategies.STRATEGIES.names()
    conv = ["exact", *(n for n in names if n not in ("exact", *NONLINEAR))]
    return {"resnet20": conv,
            "vit_tiny": ["exact", "checkpoint", RECOMPUTE, *(n for n in NONLINEAR if n in names)]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, names: list[str], batch: int, steps: int, warmup: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    runs, rows = {}, []
    for s in names:
        torch.manual_seed(0)
        model = models.build(name, num_classes=10).to(device)
        try:
            model = recompute_pairs(model) if s == RECOMPUTE else strategies.apply(model, s)
        except StrategyError as e:
            rows.append((s, f"n/a: {e}"))
            continue
        runs[s] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), [])
    peaks = {}
    for i in range(warmup + steps):
        for s, (model, opt, times) in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                peaks[s] = torch.cuda.max_memory_allocated(device)
    exact_rate = batch / statistics.median(runs["exact"][2])
    exact_bytes = activation_bytes(runs["exact"][0], x)
    for s, (model, _, times) in runs.items():
        rate, saved = batch / statistics.median(times), activation_bytes(model, x)
        cols = [f"{rate:.1f}", f"{rate / exact_rate:.2f}", f"{saved / MB:.1f}", f"{exact_bytes / saved:.2f}x"]
        if device.type == "cuda":
            cols.append(f"{peaks[s] / MB:.0f}")
        rows.append((s, " | ".join(cols)))
    return rows


def bench_kernel(device: torch.device, n: int = 1 << 26, reps: int = 20) -> list[str]:
    from actmem.compress import triton_activation as k

    lines = ["| σ | dtype | ms | GB/s (read x, write σ, σ') |", "|---|---|---|---|"]
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, device=device).to(dtype)
        for kind in k.KINDS:
            k.value_and_derivative(x, kind)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                k.value_and_derivative(x, kind)
            end.record()
            torch.cuda.synchronize(device)
            ms = start.elapsed_time(end) / reps
            lines.append(f"| {kind} | {str(dtype)[6:]} | {ms:.3f} | {3 * n * x.element_size() / ms / 1e6:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per strategy")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--models", nargs="*", default=list(groups()), choices=list(groups()))
    ap.add_argument("--strategies", nargs="*", help="only these (exact is always run)")
    args = ap.parse_args()
    device = torch.device(args.device)

    print(header(command_line(), device_name(device), datetime.datetime.now(), {
        "load average at start": f"{os.getloadavg()[0]:.1f}",
        "steps": f"batch {args.batch}, {args.steps} timed steps (median) after {args.warmup} warm-up, interleaved"}))
    head = "| model | strategy | img/s | vs exact | saved MB | activation ratio |"
    if device.type == "cuda":
        head += " peak MB |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name in args.models:
        names = [s for s in groups()[name] if not args.strategies or s == "exact" or s in args.strategies]
        for s, cols in bench_model(name, names, args.batch, args.steps, args.warmup, device):
            print(f"| {name} | {s} | {cols} |", flush=True)
    if device.type == "cuda":
        print("\nforward_ad fused kernel, 2^26 elements:\n")
        print("\n".join(bench_kernel(device)))


if __name__ == "__main__":
    main()
