"""Max batch by real trials on the GPU (issue 14): under the memory fraction the search ends on a batch
that fits next to one that does not, the failed trials leave nothing behind, the fraction is lifted
afterwards, and the answer is near the estimate from the tracked step peak (which does not see the
allocator's rounding, fragmentation and cuDNN's workspaces, so the trials' answer is the smaller)."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from actmem import models, strategies
from actmem.measure.batch_search import Job, Trials, estimate, trials

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BUDGET = 512 * 2**20


def resnet20_job(strategy: str) -> Job:
    torch.manual_seed(0)
    initial = models.build("resnet20", num_classes=10)
    return Job(lambda: strategies.apply(copy.deepcopy(initial).to("cuda"), strategy),
               lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), (3, 32, 32), 10,
               torch.device("cuda"), f"resnet20 under {strategy}")


@pytest.mark.parametrize("strategy", ["exact", "actnn"])
def test_trials_find_the_edge_and_clean_up(strategy):
    job = resnet20_job(strategy)
    Trials(job, BUDGET)(1)  # what stays allocated for good (cuBLAS's workspace) is made here
    before = torch.cuda.memory_allocated()
    result = trials(job, BUDGET)
    assert result.exact and result.failed == result.batch + 1 and 0 < result.peak <= BUDGET
    assert torch.cuda.memory_allocated() < before + 2**20  # the failed trials' tensors are all gone
    big = torch.empty(2 * BUDGET, dtype=torch.uint8, device="cuda")  # the fraction no longer holds
    del big
    guess = estimate(job, BUDGET)
    assert 0.5 * guess.batch <= result.batch <= 1.02 * guess.batch, (result, guess)


def test_the_command_line_reports_trials_on_the_gpu(tmp_path):
    res = subprocess.run([sys.executable, "-m", "actmem.maxbatch", "dataset=synthetic", "trainer.device=cuda",
                          "memory_budget=512MiB", f"hydra.run.dir={tmp_path}"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "| synthetic | resnet20 | exact |" in res.stdout
    assert f"trials on {torch.cuda.get_device_name()}" in res.stdout
    assert "does not fit" in res.stderr  # each trial is logged
