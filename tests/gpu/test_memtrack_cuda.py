"""On CUDA the step peak of live tensors (measure.step_peak) is checked against the allocator's own
peak, torch.cuda.max_memory_allocated, over the same step. The tracker replays the profiler's record of
that allocator's allocations, so the two differ by the profiler's view of the blocks (requested sizes,
where the allocator rounds up to 512 B) and by what existed before the step (counted from storage sizes)."""
from __future__ import annotations

import pytest
import torch

from actmem import models, strategies
from actmem.measure import step_peak

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("strategy", ["exact", "actnn", "division", "checkpoint"])
def test_the_peak_agrees_with_the_allocator_within_10_percent(strategy):
    torch.manual_seed(0)
    model = strategies.apply(models.build("resnet18", num_classes=10).cuda(), strategy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 3, 32, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    step_peak(model, (x, y), optimizer)  # warm-up: optimizer state, cuDNN plans, Triton compiles
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    peak = step_peak(model, (x, y), optimizer)
    torch.cuda.synchronize()
    allocator = torch.cuda.max_memory_allocated() - start
    tracked = peak.bytes - peak.start_bytes
    assert peak.bytes == sum(peak.breakdown.values())
    assert abs(allocator - tracked) < 0.1 * allocator, (tracked, allocator)
