"""The step-peak tracker: its breakdown adds up, it follows closed-form byte counts, and it agrees with
an independent measurement (resident memory on CPU; the CUDA allocator's peak in tests/gpu)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from helpers import REPO

from actmem.measure import step_peak

MB = 10**6


def test_a_linear_layer_in_closed_form():
    """out = x W^T, W 1000x1000 fp32 (4 MB), x 250x1000 (1 MB), y 250 int64 (2 kB). After a warm-up step,
    one SGD-momentum step peaks in the backward, as W's gradient (4 MB) is made: W and its momentum; x
    (saved by the matmul) and y (saved by the loss); in flight the new gradient, the loss gradient w.r.t.
    out (1 MB) and two scalars. The output itself was freed after the loss."""
    torch.manual_seed(0)
    model = nn.Linear(1000, 1000, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(250, 1000), torch.randint(0, 1000, (250,))
    step_peak(model, (x, y), optimizer)  # creates the momentum buffer
    peak = step_peak(model, (x, y), optimizer)
    assert peak.bytes == sum(peak.breakdown.values())
    assert peak.breakdown["params"] == peak.breakdown["optimizer"] == 4 * MB
    assert peak.breakdown["activations"] == 1 * MB + 250 * 8
    assert peak.breakdown["transient"] == 4 * MB + 1 * MB + 2 * 4 and peak.breakdown["grads"] == 0
    assert peak.start_bytes == 8 * MB + 1 * MB + 250 * 8  # W, momentum, x, y
    assert peak.phase == "backward"


def test_compression_moves_bytes_out_of_activations():
    from actmem import models, strategies

    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    peaks = {}
    for name in ("exact", "actnn"):
        torch.manual_seed(0)
        model = strategies.apply(models.build("resnet20", num_classes=10), name)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        step_peak(model, (x, y), optimizer)
        peaks[name] = step_peak(model, (x, y), optimizer)
        assert peaks[name].bytes == sum(peaks[name].breakdown.values())
    exact, actnn = peaks["exact"], peaks["actnn"]
    assert exact.breakdown["params"] == actnn.breakdown["params"]
    assert exact.breakdown["activations"] > 8 * actnn.breakdown["activations"]
    assert exact.bytes > 2 * actnn.bytes


AGREEMENT = """
import gc, json, sys, torch
from actmem import models, strategies
from actmem.measure import current_rss_bytes, peak_rss_bytes, reset_peak_rss, step_peak
torch.manual_seed(0)
torch.set_num_threads(1)
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
model = strategies.apply(models.build("resnet20", num_classes=10), sys.argv[1])
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
def step():
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    del loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
step()
step()
if sys.argv[2] == "tracker":
    peak = step_peak(model, (x, y), optimizer)
    print(json.dumps(peak.bytes - peak.start_bytes))
else:
    gc.collect()
    reset_peak_rss()
    before = current_rss_bytes()
    step()
    print(json.dumps(peak_rss_bytes() - before))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident-memory peaks need Linux /proc")
@pytest.mark.parametrize("strategy", ["exact", "actnn", "checkpoint"])
def test_the_peak_agrees_with_resident_memory_within_10_percent(strategy):
    """The growth of the step over what existed before it, against the growth of peak resident memory
    in the same step (glibc told to give freed blocks back: MALLOC_MMAP_THRESHOLD_), each in a process of
    its own: the profiler's own bookkeeping would otherwise leave freed heap behind that the measured step
    reuses without growing."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = {}
    for how in ("tracker", "rss"):
        out = subprocess.run([sys.executable, "-c", AGREEMENT, strategy, how], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        r[how] = json.loads(out.stdout.splitlines()[-1])
    assert abs(r["tracker"] - r["rss"]) < 0.1 * r["rss"], r


def test_the_step_runs_as_it_would_untracked():
    """Tracking must not change what autograd does. Under a TorchDispatchMode (MemTracker's way) autograd
    sums the two gradients of h out of place, one buffer more; untracked it sums them in place. p is 1 MB;
    the forward holds at most h, h * 3 and h * 4 (3 MB); the backward holds h (saved by exp) and its two
    gradients (3 MB), which must not become 4 (as they do under a dispatch mode)."""
    from actmem.measure.memtrack import track_step

    model = nn.Module()
    model.p = nn.Parameter(torch.randn(250_000))

    def step(mark):
        h = (model.p * 2).exp()
        out = h * 3
        out += h * 4
        loss = out.sum()
        del h, out
        mark("backward")
        loss.backward()

    peak = track_step(model, None, step)
    assert 3 * MB <= peak.bytes - peak.start_bytes < 3 * MB + 1000


def test_buffers_an_op_frees_before_it_returns_are_its_workspace():
    """cross_entropy is log_softmax then nll_loss inside one op: without grad, the 1 MB log-probabilities
    live only inside it, so at the peak they are transient and the op's workspace."""
    from actmem.measure.memtrack import track_step

    model = nn.Module()
    logits, y = torch.randn(250, 1000), torch.randint(0, 1000, (250,))

    def step(mark):
        with torch.no_grad():
            nn.functional.cross_entropy(logits, y)

    peak = track_step(model, None, step, inputs=(logits, y))
    assert MB <= peak.workspace < MB + 100  # and a scalar or two
    assert peak.breakdown["transient"] == peak.bytes == peak.start_bytes + peak.workspace + 4  # + the loss
