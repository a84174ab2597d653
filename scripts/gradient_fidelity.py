"""How close compressed training's gradient is to exact training's, on one real CIFAR-10 batch.

For each model and strategy config, `actmem.measure.fidelity.gradient_fidelity` on the same weights and batch
(cross-entropy, train mode; its docstring defines cos, rel. variance and mean error); memory is
activation_bytes(exact) / activation_bytes(strategy) for this batch (exact measured once per model).

    python scripts/gradient_fidelity.py --data-root data/cifar10 --out results/gradient-fidelity.md
    python scripts/gradient_fidelity.py --models resnet20 --strategies actnn division:bits=4 --seeds 4
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import sys
from pathlib import Path

import torch

from actmem import data, models, strategies
from actmem.core.provenance import command_line, device_name, header
from actmem.measure import activation_bytes
from actmem.measure.fidelity import gradient_fidelity
from actmem.strategies.spec import parse_spec

ACTNN = ["actnn:level=L0", "actnn:level=L1", "actnn:level=L2", "actnn:level=L3"]
ACTNN_BITS = ["actnn:level=L2,bits=1", "actnn:level=L2,bits=2", "actnn:level=L2,bits=8", "actnn:level=L3,bits=4"]
DIVISION = [f"division:bits={q}" for q in (1, 2, 4, 8)]
BLPA = ["blpa:bits=4", "blpa:bits=8"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "preact_resnet56"])
    ap.add_argument("--strategies", nargs="+", help="name:key=value,... (default: ActNN L0-L3 and widths, "
                    "DIVISION Q=1/2/4/8, BLPA 4/8 when registered)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--data-root", default="data/cifar10", help="CIFAR-10 image folders (`make data`)")
    ap.add_argument("--out", type=Path, help="also write the table, with its provenance, to this markdown file")
    args = ap.parse_args()
    specs = args.strategies or [*ACTNN, *ACTNN_BITS, *DIVISION,
                                *(BLPA if "blpa" in strategies.STRATEGIES.names() else [])]
    cfgs = [parse_spec(s) for s in specs]
    head = header(command_line(), device_name("cpu"), dt.datetime.now(), {
        "batch": f"the first {args.batch} images of the class-balanced CIFAR-10 training subset, no augmentation; "
                 f"fresh weights (seed 0); {args.seeds} seeds per strategy after one warm-up step",
        "columns": "see the docstrings of `scripts/gradient_fidelity.py` and `actmem.measure.fidelity`"})
    bundle = data.build({"name": "cifar10", "root": args.data_root, "train_subset": args.batch, "augment": False},
                        batch_size=args.batch, device="cpu", seed=0)
    x, y = next(iter(bundle.train))
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = models.build(name, num_classes=10)
        exact_bytes = activation_bytes(copy.deepcopy(model), x)
        for strategy, kw in cfgs:
            r = gradient_fidelity(model, x, y, {"name": strategy, **kw}, args.seeds)
            label = strategy + "".join(f" {k}={v}" for k, v in kw.items())
            rows.append(f"| {name} | {label} | {r['cos']:.4f} ({r['cos_min']:.4f}) | {r['rel_var']:.2e} | "
                        f"{r['mean_err']:.2e} | {exact_bytes / r['bytes']:.1f}x |")
            print(rows[-1], flush=True)
    table = (f"# Gradient fidelity on a real CIFAR-10 batch\n\n{head}\n"
             "| model | strategy | cos to exact, mean (min) | rel. variance | mean error | memory |\n"
             "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    if args.out:
        args.out.write_text(table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
