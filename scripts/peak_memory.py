"""Step peak of live tensor bytes per strategy, split by role (actmem.measure.step_peak).

    python scripts/peak_memory.py --out results/peak-memory.md     # resnet18 CIFAR b128, resnet50 224 b64

One real SGD-momentum training step of a fresh model (seed 0) on a seeded N(0, 1) batch, after one warm-up
step that makes the optimizer state; beside it the bytes saved for backward by one forward
(actmem.measure.activation_bytes), so the two ratios to exact can be read side by side.
"""
from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import torch

from actmem import models, strategies
from actmem.core.provenance import command_line, device_name, header
from actmem.measure import activation_bytes, step_peak
from actmem.measure.memtrack import ROLES
from actmem.strategies.spec import parse_spec

MiB = 2**20
SETTINGS = {"resnet18 CIFAR-10 32x32, batch 128": ("resnet18", 10, (128, 3, 32, 32)),
            "resnet50 ImageNet 224x224, batch 64": ("resnet50", 1000, (64, 3, 224, 224))}
SPECS = ["exact", "checkpoint", "actnn", "division", "blpa:bits=4", "fewbit"]


def measure(model_name: str, classes: int, shape, spec: str):
    name, kw = parse_spec(spec)
    torch.manual_seed(0)
    model = strategies.apply(models.build(model_name, num_classes=classes), name, **kw)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(shape, generator=g), torch.randint(0, classes, shape[:1], generator=g)
    saved = activation_bytes(model, x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step_peak(model, (x, y), optimizer)
    return saved, step_peak(model, (x, y), optimizer)


def table(rows) -> str:
    exact_saved, exact_peak = rows[0][1], rows[0][2].bytes
    lines = ["| strategy | saved for backward | ratio | step peak | ratio | when | "
             + " | ".join(ROLES) + " | of which op workspaces |",
             "|---|---:|---:|---:|---:|---|" + "---:|" * (len(ROLES) + 1)]
    for spec, saved, peak in rows:
        lines.append(f"| `{spec}` | {saved / MiB:.1f} MiB | {exact_saved / saved:.2f}x | {peak.bytes / MiB:.1f} MiB | "
                     f"{exact_peak / peak.bytes:.2f}x | {peak.phase} | "
                     + " | ".join(f"{peak.breakdown[r] / MiB:.1f}" for r in ROLES) + f" | {peak.workspace / MiB:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--strategies", nargs="*", default=SPECS)
    args = ap.parse_args(argv)
    started = dt.datetime.now()
    head = header(command_line(), device_name("cpu"), started)
    parts = [f"# Step peak of live tensors per strategy\n\n{head}\n"
             "Breakdown columns in MiB, at the peak: parameters and buffers, gradients, optimizer state (momentum), "
             "activations saved for backward, and transient buffers (outputs not yet freed, gradients in flight, "
             "decoded inputs, workspaces); of the transient, the buffers an op made for itself and frees before it "
             "returns (e.g. oneDNN's reordered copies inside a CPU convolution). `when`: the phase of the step the "
             "peak fell in. Tracker: actmem.measure.memtrack (the profiler's allocation record, replayed).\n"]
    for title in args.settings:
        model_name, classes, shape = SETTINGS[title]
        rows = []
        for spec in args.strategies:
            saved, peak = measure(model_name, classes, shape, spec)
            rows.append((spec, saved, peak))
            print(f"{title} {spec}: {peak.bytes / MiB:.1f} MiB ({peak.phase})", flush=True)
        parts.append(f"## {title}\n\n{table(rows)}\n")
    parts.append(f"Took {(dt.datetime.now() - started).total_seconds():.0f} s.\n")
    text = "\n".join(parts)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
