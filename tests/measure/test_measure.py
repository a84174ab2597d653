"""activation_bytes against an independent measurement: the growth of resident memory across a
forward pass, in a fresh process whose allocator returns freed memory to the OS (issue 3, point 3)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from helpers import REPO

from actmem import models, strategies
from actmem.measure import (
    Saved,
    Throughput,
    activation_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    saved_bytes_by_module,
    saved_tensors,
)

RSS_PROBE = r"""
import gc, json, sys, torch
from actmem import models, strategies
from actmem.measure import activation_bytes, current_rss_bytes
torch.manual_seed(0)
torch.set_num_threads(1)
name, strategy, batch, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = strategies.apply(models.build(name, num_classes=10), strategy)
x = torch.randn(batch, 3, size, size)
model(x).sum().backward()          # one step first: one-off allocations (e.g. oneDNN caches) happen here
model.zero_grad(set_to_none=False)
gc.collect()
before = current_rss_bytes()
out = model(x)
grown = current_rss_bytes() - before - out.untyped_storage().nbytes()
del out
gc.collect()
print(json.dumps({"rss_growth": grown, "activation_bytes": activation_bytes(model, x)}))
"""


def rss_vs_accounting(model: str, strategy: str, batch: int, size: int = 32) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", RSS_PROBE, model, strategy, str(batch), str(size)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model, strategy, batch", [
    ("resnet18", "exact", 64), ("resnet18", "checkpoint", 64), ("vit_tiny", "exact", 64),
])
def test_activation_bytes_matches_rss_growth(model, strategy, batch):
    m = rss_vs_accounting(model, strategy, batch)
    assert m["activation_bytes"] > 50 * 2**20  # large enough to dominate allocator noise
    assert abs(m["rss_growth"] - m["activation_bytes"]) <= 0.10 * m["activation_bytes"], m


def test_checkpoint_ratio_resnet18_batch128():
    """Issue 3: recomputation keeps > 1.5x fewer bytes than exact on resnet18, batch 128."""
    torch.manual_seed(0)
    x = torch.randn(128, 3, 32, 32)
    exact = activation_bytes(models.build("resnet18", num_classes=10), x)
    ckpt = activation_bytes(strategies.apply(models.build("resnet18", num_classes=10), "checkpoint"), x)
    print(f"resnet18 b128: exact {exact / 2**20:.1f} MiB, checkpoint {ckpt / 2**20:.1f} MiB, ratio {exact / ckpt:.2f}")
    assert exact / ckpt > 1.5


def test_storage_counted_once_and_parameters_excluded():
    x = torch.randn(64, 256)
    model = nn.Sequential(nn.Linear(256, 256, bias=False), nn.ReLU())
    # Linear saves its input for the weight gradient, ReLU its output: two 64x256 fp32; the weight is excluded.
    assert activation_bytes(model, x) == 2 * 64 * 256 * 4

    class Cube(nn.Module):
        def forward(self, t):
            return (t * t) * t  # t is saved by both products but held once; t*t is the second storage

    assert activation_bytes(Cube(), torch.randn(32, 32, requires_grad=True)) == 2 * 32 * 32 * 4


def test_per_module_breakdown_names_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    per = saved_bytes_by_module(model, x)
    # The second Linear's input is the ReLU output, already charged to the ReLU that saved it first.
    assert per == {"0": 4 * 8 * 4, "1": 4 * 8 * 4}
    assert sum(per.values()) == activation_bytes(model, x)


def test_saved_tensors_say_module_dtype_and_input_size():
    model = nn.Sequential(nn.Linear(8, 8), nn.MaxPool1d(2, return_indices=True))
    saved = saved_tensors(model, torch.randn(4, 8))
    assert set(saved) == {
        Saved("0", 4 * 8 * 4, torch.float32, 4 * 8),  # Linear's input
        Saved("1", 4 * 8 * 4, torch.float32, 4 * 8),  # the pool's input
        Saved("1", 4 * 4 * 8, torch.int64, 4 * 8),  # the pool's indices
    }
    assert {s.numel for s in saved} == {32, 16}


def test_measurement_leaves_model_state_and_rng_alone():
    model = models.build("resnet20", num_classes=10)
    x = torch.randn(8, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    activation_bytes(model, x)
    after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_throughput_skips_warmup_steps():
    meter = Throughput(torch.device("cpu"), warmup=2)
    for _ in range(5):
        meter.start()
        meter.stop(10)
    assert meter.images == 30 and meter.img_per_s > 0


def test_peak_rss_can_be_reset_between_runs():
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    high = peak_rss_bytes()
    del big
    reset_peak_rss()
    assert peak_rss_bytes() < high - 32 * 2**20
