"""Every Triton kernel specialization that training launches, compiled for sm_80 and sm_90 without a GPU.

    python -m actmem.experiments.kernel_check                       # check, print the table
    python -m actmem.experiments.kernel_check --out results/kernels-static.md

The specializations come from real use: one training step (forward and backward) of every strategy
and level on models of the zoo, in fp32 and under bf16 and fp16 autocast, with every kernel launch
recorded at `compress.launch` instead of run (the torch reference supplies the values meanwhile).
A new kernel, or a new constexpr value some strategy passes, is covered without touching this list.
Each distinct specialization is compiled for every target of `compress.static.TARGETS`; the check
fails on a compile error or on any register spill and names the kernel and its constexprs.
Runs without TRITON_INTERPRET=1 (the interpreter's kernels cannot be compiled).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import multiprocessing
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

from actmem import models, strategies
from actmem.compress import static
from actmem.compress.launch import Launch, kernels, recording
from actmem.core.errors import StrategyError
from actmem.core.provenance import header
from actmem.strategies import actnn, blpa, fewbit

# (model, input side): CIFAR nets of both ResNet kinds and a ViT, and ResNet-50 at ImageNet's 224,
# whose planes (112 .. 7) give DIVISION's kernels their ImageNet shapes.
MODELS = (("preact_resnet56", 32), ("resnet20", 32), ("vit_tiny", 32), ("resnet50", 224))
BATCH = 2
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Settings that change what a strategy launches; every other strategy runs at its defaults.
SETTINGS = {
    "actnn": [{"level": level} for level in actnn.LEVELS],
    "blpa": [{"bits": bits} for bits in blpa.BITS],
    "fewbit": [{"bits": bits} for bits in fewbit.BITS],
}


def strategy_settings() -> list[tuple[str, dict]]:
    return [(name, kw) for name in strategies.STRATEGIES.names() for kw in SETTINGS.get(name, [{}])]


def record(model_names=None, log=print, on_new=lambda launch: None) -> dict[Launch, str]:
    """Each distinct specialization launched, with the first (model, strategy, dtype) that launched it;
    on_new(launch) is called as each is first seen."""
    seen: dict[Launch, str] = {}

    def add(launch: Launch, where: str):
        if launch not in seen:
            seen[launch] = where
            on_new(launch)

    for model_name, side in MODELS:
        if model_names and model_name not in model_names:
            continue
        torch.manual_seed(0)
        built = models.build(model_name, num_classes=10)
        for name, kw in strategy_settings():
            try:
                model = strategies.apply(copy.deepcopy(built), name, **kw)
            except StrategyError:
                continue  # the strategy does not serve this model
            x = torch.randn(BATCH, 3, side, side)
            y = torch.randint(0, 10, (BATCH,))
            t = time.perf_counter()
            for dtype_name, dtype in AUTOCAST.items():
                with recording() as launches, torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                                              enabled=dtype is not None):
                    F.cross_entropy(model(x), y).backward()
                where = f"{model_name} {name}{''.join(f' {k}={v}' for k, v in kw.items())} {dtype_name}"
                for launch in launches:
                    add(launch, where)
                    if wide := widest(launch):
                        add(wide, f"{where} (at 8 bits)")
            log(f"  {model_name:16s} {name:10s} {kw or ''}: {time.perf_counter() - t:.1f} s, {len(seen)} so far")
    return seen


def widest(launch: Launch) -> Launch | None:
    """A mixed-width quantization launch specializes on its batch's widest code (BITS, PLANES), which the
    data decides: the same launch at the widest width, 8 bits, which needs the most registers."""
    consts = dict(launch.constexprs)
    if not consts.get("MIXED") or consts["PLANES"] == 8:
        return None
    consts.update(BITS=8, PLANES=8)
    return dataclasses.replace(launch, constexprs=tuple(consts.items()))


def record_and_compile(model_names=None, workers: int = 2):
    """record(), compiling each specialization for every target as soon as it is seen (in `workers`
    processes, beside the recording); a failed compile becomes (launch, arch, error text)."""
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = []
        seen = record(model_names, on_new=lambda launch: futures.extend(
            pool.submit(_compile, launch, arch) for arch in static.TARGETS))
        return seen, [f.result() for f in futures]


def _compile(launch: Launch, arch: int):
    try:
        return static.compile_launch(launch, arch)
    except Exception as e:  # reported with the kernel's name and constexprs, not raised
        return launch, arch, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def problems(results) -> list[str]:
    """One line per compile error or spill."""
    out = []
    for r in results:
        if isinstance(r, tuple):
            launch, arch, error = r
            out.append(f"sm_{arch}: {launch.name} failed to compile: {error}")
        elif r.spills:
            out.append(f"sm_{r.arch}: {r.launch.name} spills {r.spill_stores} B stored / {r.spill_loads} B loaded "
                       f"({r.registers} registers)")
    return out


def report(results, seen: dict[Launch, str], reference_elements: int = 1 << 24) -> str:
    """Markdown: a summary per kernel and target (worst case over its specializations), then every
    specialization with its registers, spills, shared memory, warps and occupancy per target."""
    compiled = [r for r in results if not isinstance(r, tuple)]
    cards = ", ".join(f"sm_{a}: {t['card']} {t['bandwidth']} GB/s" for a, t in static.TARGETS.items())
    lines = [
        f"Per kernel and target, the worst of its specializations. Traffic per element counts every tensor "
        f"argument read or written once (the compulsory DRAM traffic); the floor is that traffic for "
        f"2^{reference_elements.bit_length() - 1} elements (a 64 MiB fp32 activation) at the card's datasheet "
        f"bandwidth ({cards}).",
        "",
        "| kernel | target | specializations | registers (max) | spill bytes | shared KiB (max) | warps | "
        "occupancy (min) | bytes / element (max) | floor µs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kernel in sorted({r.launch.kernel for r in compiled}):
        for arch, sm in static.TARGETS.items():
            rows = [r for r in compiled if r.launch.kernel == kernel and r.arch == arch]
            if not rows:
                continue
            per_element = max(r.launch.traffic[0] / r.launch.traffic[1] for r in rows)
            floor_us = per_element * reference_elements / (sm["bandwidth"] * 1e3)
            lines.append(
                f"| {kernel} | sm_{arch} | {len(rows)} | {max(r.registers for r in rows)} | "
                f"{sum(r.spills for r in rows)} | {max(r.shared for r in rows) / 1024:.1f} | "
                f"{'/'.join(sorted({str(r.warps) for r in rows}))} | {min(r.occupancy for r in rows):.0%} | "
                f"{per_element:.2f} | {floor_us:.0f} |")
    low = min((r for r in compiled if r.arch == 90), key=lambda r: r.occupancy, default=None)
    if low is not None:
        lines += ["", f"Lowest theoretical occupancy on sm_90: {low.occupancy:.0%} ({low.launch.kernel}, "
                  f"{low.registers} registers, {low.warps} warps); the bar for a memory-bound kernel is 25 %."]
    lines += ["", "Every specialization (registers / spill bytes / occupancy per target), with the first run that "
              "launched it:", "", "| specialization | first launched by | "
              + " | ".join(f"sm_{a}" for a in static.TARGETS) + " |", "|---|---|" + "---|" * len(static.TARGETS)]
    by_launch: dict[Launch, dict[int, str]] = {}
    for r in results:
        if isinstance(r, tuple):
            by_launch.setdefault(r[0], {})[r[1]] = f"error: {r[2]}"
        else:
            by_launch.setdefault(r.launch, {})[r.arch] = f"{r.registers} / {r.spills} / {r.occupancy:.0%}"
    for launch in sorted(by_launch, key=lambda x: x.name):
        cells = " | ".join(by_launch[launch].get(a, "") for a in static.TARGETS)
        lines.append(f"| `{launch.name}` | {seen[launch]} | {cells} |")
    return "\n".join(lines)


def report_header(argv, started, seconds: float) -> str:
    """What made the report: command, commit, date, compiler; no GPU ran anything."""
    from triton.backends.nvidia.compiler import get_ptxas_version

    command = shlex.join(["python", "-m", "actmem.experiments.kernel_check", *(sys.argv[1:] if argv is None else argv)])
    ptxas = get_ptxas_version().split("release")[-1].split(",")[0].strip()
    device = (f"none. Compiled on the CPU (ptxas {ptxas}); these are static figures of the compiler, not "
              "measurements of a GPU run")
    took = {"took": f"{seconds:.0f} s"}
    return f"# Kernels, compiled for GPUs without one\n\n{header(command, device, started, took)}\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the markdown report here (besides printing the problems)")
    ap.add_argument("--models", nargs="*", help=f"only these of {', '.join(m for m, _ in MODELS)}")
    ap.add_argument("--workers", type=int, default=2, help="compile processes")
    args = ap.parse_args(argv)
    t0, started = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc)
    print("recording one training step of every strategy setting, compiling as launches appear:", flush=True)
    seen, results = record_and_compile(args.models, args.workers)
    never = sorted(set(kernels()) - {launch.kernel for launch in seen})
    print(f"{len(seen)} specializations of {len({launch.kernel for launch in seen})} kernels, compiled for "
          f"{', '.join(f'sm_{a}' for a in static.TARGETS)} in {time.perf_counter() - t0:.0f} s; kernels no run "
          f"launched: {', '.join(never) or 'none'}", flush=True)
    for launch in sorted(seen, key=lambda x: x.name):
        print(f"  {launch.name}  <- {seen[launch]}")
    if args.out:
        text = report_header(argv, started, time.perf_counter() - t0) + report(results, seen)  # before the file exists
        with open(args.out, "w") as f:
            f.write(text + "\n")
    found = problems(results)
    for line in found:
        print("FAIL", line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
