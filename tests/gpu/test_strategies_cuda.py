"""Every strategy's forward on CUDA is exact's, bit for bit: fp32 and under bf16 autocast, NCHW and
channels_last. The twin then runs backward through the GPU kernels (finite gradients), and its next
forward, after updated statistics and L3's reallocated budgets, is still exact's. The same check as
the CPU tests of tests/strategies, on the GPU path: Triton kernels, cuDNN, CUDA autocast."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from actmem import models, strategies

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda"
MODELS = {  # name: (build kwargs, input shape)
    "resnet18": ({}, (4, 3, 32, 32)),
    "preact_resnet56": ({}, (4, 3, 32, 32)),
    "resnet50": ({}, (2, 3, 64, 64)),
    "vit_tiny": ({"depth": 2}, (2, 3, 32, 32)),
}
CONV = [("checkpoint", {}), *[("actnn", {"level": lv}) for lv in ("L1", "L2", "L3")], ("division", {}),
        ("blpa", {"bits": 4}), ("blpa", {"bits": 8})]
CASES = (
    [("resnet18", name, kw) for name, kw in CONV]
    + [("preact_resnet56", name, kw) for name, kw in CONV if kw.get("level") in (None, "L3")]
    + [("resnet50", name, kw) for name, kw in (("checkpoint", {}), ("actnn", {}), ("division", {}), ("blpa", {}))]
    + [("vit_tiny", "fewbit", {"bits": bits}) for bits in (1, 2, 3, 4)]
    + [("vit_tiny", name, {}) for name in ("forward_ad", "combo", "actnn")]
)
MODES = {  # autocast dtype, channels_last
    "fp32": (None, False),
    "bf16": (torch.bfloat16, False),
    "fp32-channels_last": (None, True),
    "bf16-channels_last": (torch.bfloat16, True),
}


def case_id(case) -> str:
    model, name, kw = case
    return "-".join([model, name, *(f"{k}{v}" for k, v in kw.items())])


@pytest.fixture(autouse=True)
def deterministic_cudnn(monkeypatch):
    """The same convolution algorithm for exact and twin, so any difference is the strategy's."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


@functools.cache
def exact_on_cpu(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build(name, num_classes=10, **MODELS[name][0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_bit_identical_to_exact(case, mode):
    model, name, kw = case
    dtype, channels_last = MODES[mode]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    exact = copy.deepcopy(exact_on_cpu(model)).to(DEVICE, memory_format=fmt)  # as actmem.train: device, format,
    twin = strategies.apply(copy.deepcopy(exact), name, **kw)  # then the strategy
    x = torch.randn(MODELS[model][1], generator=torch.Generator().manual_seed(1)).to(DEVICE, memory_format=fmt)
    for step in range(2):
        with torch.autocast(DEVICE, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out_exact, out_twin = exact(x), twin(x)
        assert out_twin.dtype == out_exact.dtype and torch.equal(out_exact, out_twin), f"step {step}"
        out_twin.float().square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in twin.parameters() if p.grad is not None), f"step {step}"
    for (n, be), bt in zip(exact.named_buffers(), twin.buffers()):
        assert torch.equal(be, bt), f"buffer {n}"
