"""Which implementation runs: Triton kernels on CUDA tensors, the torch reference elsewhere.

`ACTMEM_BACKEND=reference|triton` forces one; with `TRITON_INTERPRET=1`, `triton` runs on CPU tensors
(that is how the tests check every kernel against the reference on a machine without a GPU).
Every compress function goes through `dispatch`, which also serves the compile check: while launches
are only recorded (launch.record_only), it takes both paths, the kernel one for its launches and the
reference for the values.
"""
from __future__ import annotations

import os

import torch

from actmem.compress.errors import CompressError
from actmem.compress.launch import not_recording, record_only

BACKENDS = ("reference", "triton")


def use_triton(x: torch.Tensor) -> bool:
    forced = os.environ.get("ACTMEM_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise CompressError(f"ACTMEM_BACKEND={forced!r} is not a backend; use one of: {', '.join(BACKENDS)}.")
    if forced == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise CompressError("ACTMEM_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1.")
        return True
    if forced == "reference":
        return False
    return x.is_cuda


def dispatch(x: torch.Tensor, on_triton, on_reference, *args):
    """on_triton(*args) where the Triton kernels serve x (use_triton), else on_reference(*args); with
    autocast off, since both paths choose their dtypes themselves (and must agree bit for bit)."""
    with torch.autocast(x.device.type, enabled=False):
        if record_only():
            on_triton(*args)
            with not_recording():  # the reference's own compress calls are no launches of the kernel path
                return on_reference(*args)
        return (on_triton if use_triton(x) else on_reference)(*args)
