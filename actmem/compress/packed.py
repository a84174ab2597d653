"""`Packed`: what a strategy keeps for backward instead of an activation.

A strategy saves `p.tensors()` with `ctx.save_for_backward` (so autograd -- and
`actmem.measure.activation_bytes` -- sees exactly these bytes) and rebuilds it in backward with
`p.with_tensors(ctx.saved_tensors)`. Every tensor in it owns a compact storage, so `nbytes` equals
the storage bytes that the graph keeps alive.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

_DECODERS: dict[str, Callable[[Packed], torch.Tensor]] = {}


def register_layout(name: str):
    """Decorator for the function that decodes one layout back to a dense tensor."""

    def deco(fn):
        _DECODERS[name] = fn
        return fn

    return deco


@dataclass(frozen=True)
class Packed:
    codes: torch.Tensor  # packed integer codes, 1-D uint8 (see packing.py)
    meta: tuple[torch.Tensor, ...]  # per-layout metadata (group min/scale, low-frequency part, ...)
    shape: torch.Size  # shape of the original tensor
    dtype: torch.dtype  # dtype of the original tensor
    bits: int  # code width (for mixed precision: the widest; per-sample widths live in meta)
    layout: str  # which decoder applies: "group", "split", "grid", ...
    params: dict[str, Any] = field(default_factory=dict)  # static layout parameters (group_size, ...)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.codes, *self.meta)

    def with_tensors(self, tensors) -> Packed:
        tensors = tuple(tensors)
        return replace(self, codes=tensors[0], meta=tensors[1:])

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    @property
    def device(self) -> torch.device:
        return self.codes.device


def decode(p: Packed) -> torch.Tensor:
    """Dense tensor of p.shape / p.dtype / p.device, by the layout's registered decoder."""
    if p.layout not in _DECODERS:
        raise ValueError(f"no decoder for layout {p.layout!r}; known: {', '.join(sorted(_DECODERS))}")
    return _DECODERS[p.layout](p)
