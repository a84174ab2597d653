"""Which implementation runs: Triton kernels on CUDA tensors, the torch reference elsewhere.

`ACTMEM_BACKEND=reference|triton` forces one; with `TRITON_INTERPRET=1`, `triton` runs on CPU tensors
(that is how the tests check every kernel against the reference on a machine without a GPU).
"""
from __future__ import annotations

import os

import torch

from actmem.errors import ConfigError

BACKENDS = ("reference", "triton")


def use_triton(x: torch.Tensor) -> bool:
    forced = os.environ.get("ACTMEM_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ConfigError(f"ACTMEM_BACKEND={forced!r} is not a backend; use one of: {', '.join(BACKENDS)}.")
    if forced == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("ACTMEM_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1.")
        return True
    if forced == "reference":
        return False
    return x.is_cuda
