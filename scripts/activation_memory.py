"""Activation memory of each strategy in the anchors' settings: activation_ratio (docs/contracts.md) and where the
bytes that stay uncompressed are.

    python scripts/activation_memory.py --out results/activation-memory.md          # every setting
    python scripts/activation_memory.py --settings preact164_cifar --strategies exact blpa:bits=4 actnn

A strategy is `name` or `name:key=value,key=value` (values read as YAML: `division:compress_linear=false`).
One that is not registered, or that refuses the model, gets a row saying so. Bytes are counted by
`actmem.measure.saved_tensors` (what autograd keeps after one training-mode forward of a fresh
model, seed 0, on a seeded N(0, 1) batch); they do not depend on the device, so this runs on the CPU,
each model in a fresh process (resnet50 at 224x224, batch 64 keeps about 5 GiB exact).

"Kept whole" is what a strategy leaves uncompressed: saved floating-point tensors with more than a
quarter of the elements of the input of the layer saving them, and int64/int32 tensors (exact max-pool
indices). Smaller floating tensors are metadata (per-group scales, DIVISION's low-frequency part, BN
statistics) and uint8/bool tensors are codes and masks. `--peak` adds, for the settings named, the
peak resident memory of one training step (forward and backward) above the memory before it, each in
a fresh process.

glibc's malloc is told to map every allocation above 64 KiB on its own (M_MMAP_THRESHOLD), so a freed
tensor goes back to the system at once: one model after another then fits in memory, and peak RSS is
what was live (with the default, reused heap pages inflated the peak RSS of the same step by up to 2x).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import subprocess
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from actmem import models, strategies
from actmem.core.errors import ConfigError
from actmem.core.provenance import command_line, device_name, header
from actmem.measure import Saved, current_rss_bytes, peak_rss_bytes, saved_tensors
from actmem.strategies.spec import expand, parse_spec

GiB, MiB = 2**30, 2**20
LEVELS = [f"actnn:level=L{i}" for i in range(4)]


@dataclass(frozen=True)
class Setting:
    title: str
    model: str
    num_classes: int
    shape: tuple[int, ...]
    strategies: list[str]
    paper_gib: dict[str, float] = field(default_factory=dict)  # docs/published-figures.md, by strategy spec


SETTINGS = {
    "resnet50_224": Setting(
        "resnet50, ImageNet shape 224x224, batch 64", "resnet50", 1000, (64, 3, 224, 224),
        ["exact", "checkpoint", *LEVELS, "division", "division:compress_linear=false", "blpa:bits=4", "blpa:bits=8"],
        {"exact": 5.14, "checkpoint": 2.24, "blpa:bits=4": 0.82, "actnn:level=L3": 0.49, "division": 0.49}),
    "preact164_cifar": Setting(
        "preact_resnet164, CIFAR shape 32x32, batch 128", "preact_resnet164", 10, (128, 3, 32, 32),
        ["exact", "blpa:bits=4", "blpa:bits=8", "actnn", "division"]),
    "resnet18_cifar": Setting(
        "resnet18, CIFAR-10 shape 32x32, batch 128", "resnet18", 10, (128, 3, 32, 32),
        ["exact", "checkpoint", *LEVELS, "division", "division:compress_linear=false", "blpa:bits=4",
         "blpa:bits=8", "*"]),  # "*": every other registered strategy, with its defaults
}
TARGETS = [  # (setting, strategy, minimum ratio): the acceptance targets
    ("resnet50_224", "actnn:level=L3", 11.0), ("resnet50_224", "division", 10.0),
    ("preact164_cifar", "blpa:bits=4", 6.0),
]


def group(name: str, modules: dict[str, nn.Module]) -> str:
    """A layer by its part in its block, the same in every block (`layer1.0.bn3` -> `Bottleneck.bn3`);
    a layer outside any block by its name."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        block = modules.get(".".join(parts[:i]))
        if isinstance(block, models.block_types()):
            return f"{type(block).__name__}.{'.'.join(parts[i:])}"
    return name


def layer_type(module: nn.Module | None) -> str:
    """A swapped layer counts as the torch.nn class it replaces (BlpaConv2d -> Conv2d)."""
    if module is None:
        return "(no module)"
    base = next((c for c in type(module).__mro__ if c.__module__.startswith("torch.nn.modules")
                 and c is not nn.Module), type(module))
    return base.__name__


def kept_whole(s: Saved) -> bool:
    """Left uncompressed (module doc): not metadata, codes or masks."""
    return (s.dtype.is_floating_point and 4 * s.numel > s.input_numel) or s.dtype in (torch.int64, torch.int32)


@dataclass
class Row:
    spec: str
    note: str = ""  # why there is no measurement
    total: int = 0
    whole: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    whole_by_type: dict[str, int] = field(default_factory=dict)
    top_whole: list[tuple[str, int]] = field(default_factory=list)  # the largest layer groups (`group`)
    peak: int | None = None


def build(setting: Setting, spec: str) -> tuple[nn.Module | None, str]:
    name, kw = parse_spec(spec)
    if name not in strategies.STRATEGIES.names():
        return None, "not registered yet"
    torch.manual_seed(0)
    model = models.build(setting.model, num_classes=setting.num_classes)
    try:
        return strategies.apply(model, name, **kw), ""
    except ConfigError as e:  # StrategyError included: the strategy refuses this model
        return None, f"refused: {e}"


def batch(setting: Setting) -> torch.Tensor:
    return torch.randn(setting.shape, generator=torch.Generator().manual_seed(0))


def measure(setting: Setting, spec: str) -> Row:
    model, note = build(setting, spec)
    if model is None:
        return Row(spec, note)
    saved = saved_tensors(model, batch(setting))
    modules = dict(model.named_modules())
    by_type: dict[str, int] = defaultdict(int)
    whole_by_type: dict[str, int] = defaultdict(int)
    by_group: dict[str, int] = defaultdict(int)
    for s in saved:
        by_type[layer_type(modules.get(s.module))] += s.nbytes
        if kept_whole(s):
            whole_by_type[layer_type(modules.get(s.module))] += s.nbytes
            by_group[group(s.module, modules)] += s.nbytes
    top = sorted(by_group.items(), key=lambda nb: -nb[1])[:3]
    return Row(spec, total=sum(s.nbytes for s in saved), whole=sum(whole_by_type.values()), by_type=dict(by_type),
               whole_by_type=dict(whole_by_type), top_whole=top)


def step_peak(setting: Setting, spec: str) -> int | None:
    """Peak RSS of one training step above the RSS before it (bytes); run in a fresh process."""
    model, _ = build(setting, spec)
    if model is None:
        return None
    x, y = batch(setting), torch.zeros(setting.shape[0], dtype=torch.long)
    gc.collect()
    before = current_rss_bytes()
    F.cross_entropy(model(x), y).backward()
    return peak_rss_bytes() - before


def child(task: str, setting_name: str, spec: str):
    """Run `task` for one model in a fresh process: its memory (and any leaked by a measurement) goes
    back to the system when it exits, and the next model starts from nothing."""
    out = subprocess.run([sys.executable, __file__, "--child", task, setting_name, spec], capture_output=True,
                         text=True)
    if out.returncode:
        raise RuntimeError(f"{task} {setting_name} {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def table(setting: Setting, rows: list[Row]) -> str:
    exact = next((r.total for r in rows if r.spec == "exact" and r.total), None)
    show_paper = bool(setting.paper_gib)
    show_peak = any(r.peak is not None for r in rows)
    head = ["strategy", "activation", "ratio"] + (["paper"] if show_paper else []) + \
        ["kept whole", "where: the 3 largest groups of layers kept whole"] + (["step peak RSS"] if show_peak else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        paper = setting.paper_gib.get(r.spec)
        paper_cell = [f"{paper:.2f} GiB ({setting.paper_gib['exact'] / paper:.1f}x)" if paper else ""]
        if not r.total:
            cells = [f"`{r.spec}`", r.note.replace("|", "/").replace("\n", " "), ""] + \
                (paper_cell if show_paper else []) + ["", ""] + ([""] if show_peak else [])
        else:
            where = ", ".join(f"`{n}` {fmt_bytes(b)}" for n, b in r.top_whole) or "none"
            cells = [f"`{r.spec}`", fmt_bytes(r.total), f"{exact / r.total:.2f}x" if exact else "",
                     *(paper_cell if show_paper else []), f"{100 * r.whole / r.total:.1f}%", where,
                     *([fmt_bytes(r.peak) if r.peak is not None else ""] if show_peak else [])]
        lines.append("| " + " | ".join(cells) + " |")
    measured = [r for r in rows if r.total]
    types = sorted({t for r in measured for t in r.by_type}, key=lambda t: -max(r.by_type.get(t, 0) for r in measured))
    by_type = ["| layer type | " + " | ".join(f"`{r.spec}`" for r in measured) + " |",
               "|" + "---|" * (len(measured) + 1)]
    for t in types:
        cells = (f"{r.by_type.get(t, 0) / MiB:.1f} ({r.whole_by_type.get(t, 0) / MiB:.1f})" for r in measured)
        by_type.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nBytes by layer type, MiB (of which kept whole):\n\n" + "\n".join(by_type)


def return_freed_memory() -> None:
    """mallopt(M_MMAP_THRESHOLD, 64 KiB) where the C library is glibc (module doc)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
    except OSError:  # not glibc: measure with its allocator as it is
        pass


def main() -> int:
    return_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--strategies", nargs="+", help="strategy specs for every setting (default: each setting's list)")
    ap.add_argument("--peak", nargs="*", default=[], choices=list(SETTINGS),
                    help="settings whose rows also get the peak RSS of one training step")
    ap.add_argument("--out", type=Path, help="also write the tables, with their provenance, to this markdown file")
    ap.add_argument("--child", nargs=3, metavar=("TASK", "SETTING", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        task, key, spec = args.child
        result = step_peak(SETTINGS[key], spec) if task == "peak" else asdict(measure(SETTINGS[key], spec))
        print(json.dumps(result))
        return 0
    head = "# Activation memory per strategy\n\n" + header(command_line(), device_name("cpu"), dt.datetime.now(), {
        "what": "bytes autograd keeps after one training-mode forward (`measure.saved_tensors`), fresh model "
                "(seed 0), seeded N(0, 1) batch; ratio = exact / strategy (docs/contracts.md: activation_ratio)",
        "kept whole": "the share of those bytes left uncompressed (see the script's docstring)"})

    sections, results = [], {}
    for key in args.settings:
        setting = SETTINGS[key]
        rows = []
        for spec in expand(args.strategies or setting.strategies):
            row = Row(**child("measure", key, spec))
            if key in args.peak and row.total:
                row.peak = child("peak", key, spec)
            rows.append(row)
            results[key, spec] = row
            print(f"{key} {spec}: {fmt_bytes(row.total) if row.total else row.note[:100]}", flush=True)
        sections.append(f"## {setting.title}\n\nsetting `{key}`: `models.build({setting.model!r}, "
                        f"num_classes={setting.num_classes})`, input {list(setting.shape)}\n\n{table(setting, rows)}")

    checks = []
    exact50 = results.get(("resnet50_224", "exact"))
    if exact50 and exact50.total:
        off = exact50.total / GiB / 5.14 - 1
        checks.append(f"- exact resnet50 b64: {exact50.total / GiB:.3f} GiB vs 5.14 GiB in the paper "
                      f"({100 * off:+.1f}%): {'met' if abs(off) <= 0.05 else 'MISSED'} (within 5%)")
    for key, spec, target in TARGETS:
        row, exact = results.get((key, spec)), results.get((key, "exact"))
        if row and exact and row.total and exact.total:
            ratio = exact.total / row.total
            checks.append(f"- `{spec}` on {key}: {ratio:.2f}x, target >= {target:g}x: "
                          f"{'met' if ratio >= target else 'MISSED'}")

    targets = "\n## Targets\n\n" + "\n".join(checks) + "\n" if checks else ""
    text = head + targets + "\n" + "\n\n".join(sections) + "\n"
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
