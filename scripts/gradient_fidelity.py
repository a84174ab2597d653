"""How close compressed training's gradient is to exact training's, on one real CIFAR-10 batch.

For each model and strategy config: the same weights and batch (cross-entropy, train mode), one
warm-up step (ActNN L3 allocates its bits from a gradient), then one backward per seed. Reported:
- cos: cosine similarity of the full parameter gradient to exact's, mean over seeds (min in brackets);
- rel. variance: E_s ||g_s - mean_s g||^2 / ||g_exact||^2, the spread over seeds (sample variance);
- mean error: ||mean_s g_s - g_exact|| / ||g_exact||; for an unbiased strategy about
  sqrt(rel. variance / seeds), for a deterministic one its bias;
- memory: activation_bytes(exact) / activation_bytes(strategy) for this batch (exact measured once
  per model).

    python scripts/gradient_fidelity.py --data-root data/cifar10 --out results/gradient-fidelity.md
    python scripts/gradient_fidelity.py --models resnet20 --strategies actnn division:bits=4 --seeds 4
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import platform
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from actmem import data, models, strategies
from actmem.measure import activation_bytes
from actmem.provenance import git_commit

ACTNN = ["actnn:level=L0", "actnn:level=L1", "actnn:level=L2", "actnn:level=L3"]
ACTNN_BITS = ["actnn:level=L2,bits=1", "actnn:level=L2,bits=2", "actnn:level=L2,bits=8", "actnn:level=L3,bits=4"]
DIVISION = [f"division:bits={q}" for q in (1, 2, 4, 8)]
BLPA = ["blpa:bits=4", "blpa:bits=8"]


def parse(spec: str) -> dict:
    """"name:key=value,key=value" -> {"name": name, key: value} (values read as YAML scalars)."""
    name, _, rest = spec.partition(":")
    cfg = {"name": name}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        cfg[key] = yaml.safe_load(value)
    return cfg


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def step(model, x, y, seed: int) -> torch.Tensor:
    model.zero_grad(set_to_none=False)
    torch.manual_seed(seed)
    F.cross_entropy(model(x), y).backward()
    return flat_grad(model)


def fidelity(model, x, y, cfg: dict, seeds: int) -> dict:
    """Gradient statistics of strategy `cfg` against exact, for `model` (left untouched) on (x, y), and
    the bytes the strategy keeps for backward."""
    exact = copy.deepcopy(model)
    g_exact = step(exact, x, y, 0)
    twin = strategies.apply(copy.deepcopy(model), cfg)
    step(twin, x, y, 0)  # warm-up
    grads = torch.stack([step(twin, x, y, 1 + s) for s in range(seeds)])
    norm2 = g_exact.square().sum()
    cos = F.cosine_similarity(grads, g_exact[None], dim=1)
    return {
        "cos": float(cos.mean()), "cos_min": float(cos.min()),
        "rel_var": float(grads.var(0).sum() / norm2) if seeds > 1 else float("nan"),
        "mean_err": float((grads.mean(0) - g_exact).norm() / norm2.sqrt()),
        "bytes": activation_bytes(twin, x),
    }


def label(cfg: dict) -> str:
    return cfg["name"] + "".join(f" {k}={v}" for k, v in cfg.items() if k != "name")


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
    cfgs = [parse(s) for s in specs]
    commit, started = git_commit(), dt.datetime.now().isoformat(timespec="seconds")
    bundle = data.build({"name": "cifar10", "root": args.data_root, "train_subset": args.batch, "augment": False},
                        batch_size=args.batch, device="cpu", seed=0)
    x, y = next(iter(bundle.train))
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = models.build(name, num_classes=10)
        exact_bytes = activation_bytes(copy.deepcopy(model), x)
        for cfg in cfgs:
            r = fidelity(model, x, y, cfg, args.seeds)
            rows.append(f"| {name} | {label(cfg)} | {r['cos']:.4f} ({r['cos_min']:.4f}) | {r['rel_var']:.2e} | "
                        f"{r['mean_err']:.2e} | {exact_bytes / r['bytes']:.1f}x |")
            print(rows[-1], flush=True)
    shown = " ".join(["python", *map(shlex.quote, sys.argv)])
    header = (f"# Gradient fidelity on a real CIFAR-10 batch\n\n- command: `{shown}`\n- commit: {commit}\n"
              f"- date: {started}\n"
              f"- device: CPU ({platform.machine()}, {torch.get_num_threads()} threads); torch {torch.__version__}\n"
              f"- batch: the first {args.batch} images of the class-balanced CIFAR-10 training subset, no "
              f"augmentation; fresh weights (seed 0); {args.seeds} seeds per strategy after one warm-up step\n"
              f"- columns: see the docstring of `scripts/gradient_fidelity.py`\n\n"
              "| model | strategy | cos to exact, mean (min) | rel. variance | mean error | memory |\n"
              "|---|---|---|---|---|---|\n")
    table = header + "\n".join(rows) + "\n"
    if args.out:
        args.out.write_text(table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
