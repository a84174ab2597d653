"""What several test modules share (importable because pytest puts tests/ on sys.path)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch

from actmem import strategies

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ACTMEM_SHARED_DATA", REPO.parent / "shared" / "data"))


def run_train(*overrides: str, run_dir: Path, timeout: float = 600, env: dict | None = None):
    """`python -m actmem.train` in a subprocess, its run directory pinned to `run_dir`."""
    assert (REPO / "configs" / "config.yaml").is_file(), f"not a checkout of actmem: {REPO}"
    cmd = [sys.executable, "-m", "actmem.train", f"hydra.run.dir={run_dir}", "trainer.progress=false", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# Models every layer-wise strategy is checked on: name -> (build kwargs, input shape); small enough for CI.
FORWARD_MODELS = {
    "resnet18": ({}, (4, 3, 32, 32)),
    "resnet20": ({}, (4, 3, 32, 32)),
    "preact_resnet56": ({}, (4, 3, 32, 32)),
    "densenet121": ({}, (2, 3, 32, 32)),
    "vit_tiny": ({"depth": 2}, (2, 3, 32, 32)),
    "resnet50": ({}, (2, 3, 64, 64)),
}


def mean_gradient_errors(model, x, counts, strategy: str, **cfg) -> list[float]:
    """Relative error, against exact, of the strategy's gradient averaged over the first k seeds, for each
    k in counts: it falls as k grows where the rounding is unbiased."""
    exact = copy.deepcopy(model)
    exact(x).square().sum().backward()
    g_exact = torch.cat([p.grad.flatten() for p in exact.parameters()]).double()
    twin = strategies.apply(model, strategy, **cfg)
    total, errors = torch.zeros_like(g_exact), []
    for k in range(1, max(counts) + 1):
        twin.zero_grad()
        torch.manual_seed(k)
        twin(x).square().sum().backward()
        total += torch.cat([p.grad.flatten() for p in twin.parameters()]).double()
        if k in counts:
            errors.append(float((total / k - g_exact).norm() / g_exact.norm()))
    return errors


class RunsCode:
    """Unpickled, it would create the file `marker`: what a crafted checkpoint does to whoever loads it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
