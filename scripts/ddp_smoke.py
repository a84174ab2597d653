"""Data-parallel smoke table: each strategy trained by one process and by `torchrun --nproc_per_node=N`
(the same per-rank batch), then global img/s, img/s per rank and activation bytes per rank side by side.

    python scripts/ddp_smoke.py --out results/ddp-cpu.md                          # CPU, gloo, 2 ranks
    python scripts/ddp_smoke.py --ranks 2 --strategies exact,actnn trainer.device=cuda dataset=cifar10
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from actmem.core.provenance import command_line, device_name, header
from actmem.experiments.gpu_suite.base import Table, num

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = ["dataset=synthetic", "dataset.train_size=2048", "dataset.test_size=256", "model=resnet20",
            "trainer.batch_size=64", "trainer.epochs=1", "trainer.device=cpu", "trainer.threads=1", "logger=none",
            "trainer.progress=false"]


def train(ranks: int, strategy: str, overrides: list[str], run_dir: Path) -> dict:
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    cmd = [sys.executable, *launch, "-m", "actmem.train", *DEFAULTS, *overrides, f"strategy={strategy}",
           f"hydra.run.dir={run_dir}"]
    print("+", shlex.join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, env={"OMP_NUM_THREADS": "1", **os.environ})
    return json.loads((run_dir / "summary.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--strategies", default="exact,actnn")
    ap.add_argument("--out", type=Path, help="also write the table, with its provenance, to this markdown file")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides after the defaults: " + " ".join(DEFAULTS))
    args = ap.parse_args()
    started = dt.datetime.now()
    root = REPO / "outputs" / "ddp-smoke" / started.strftime("%Y-%m-%d_%H-%M-%S")
    cuda = "trainer.device=cuda" in args.overrides and torch.cuda.is_available()
    head = header(command_line(), device_name("cuda" if cuda else "cpu"), started,
                  {"settings": " ".join(DEFAULTS + args.overrides), "runs": f"under `{root.relative_to(REPO)}`"})
    table = Table("strategy", "ranks", "batch per rank", "global batch", "img/s (all ranks)", "img/s per rank",
                  "activation MB per rank", "activation ratio", "test acc %")
    for strategy in args.strategies.split(","):
        for ranks in (1, args.ranks):
            s = train(ranks, strategy, args.overrides, root / f"{strategy}-{ranks}")
            rate = s["throughput_img_s"]
            table.add(strategy, ranks, s["batch_size"], s["global_batch_size"], num(rate),
                      num(rate / ranks if rate else None), num(s["activation_bytes"] / 2**20, ".2f"),
                      num(s["activation_ratio"], ".2f"), num(s["test_acc"], ".2f"))
    text = f"# Data-parallel smoke run\n\n{head}\n{table}\n"
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
