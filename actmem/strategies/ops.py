"""The strategy kit, part 2: what a compressed autograd Function needs.

- `save_packed` / `load_packed`: keep Packed state through `ctx.save_for_backward` (what autograd's
  hooks, and so `actmem.measure`, see), only the layouts on ctx; `keep(x)` is x itself as a Packed.
- `autocast_inputs`: cast as autocast casts conv/linear/matmul inputs, so a Function packs the values
  the exact op computes with.
- `conv_backward` / `linear_backward`: the layer's backward from a rebuilt (decoded or recomputed)
  input, rebuilt only for the weight gradient and dropped before the input gradient is made; the input
  gradient needs only the weight, so it stays exact.
"""
from __future__ import annotations

import dataclasses

import torch

from actmem.compress.packed import Packed, register_layout


@register_layout("raw")
def _raw(p: Packed) -> torch.Tensor:
    return p.codes.view(p.dtype).view(p.shape)


def keep(x: torch.Tensor) -> Packed:
    """x itself, uncompressed (layout "raw": its bytes viewed as uint8, no copy): for inputs a codec
    would only enlarge."""
    codes = x.detach().contiguous().view(-1).view(torch.uint8)
    return Packed(codes, (), x.shape, x.dtype, 8 * x.element_size(), "raw")


def save_packed(ctx, packs: list[Packed], *others: torch.Tensor | None) -> None:
    """Save the packed tensors (and e.g. the weight) visibly; keep only their layouts on ctx."""
    ctx.layouts = [dataclasses.replace(p, codes=None, meta=()) for p in packs]
    ctx.counts = [len(p.tensors()) for p in packs]
    ctx.save_for_backward(*(t for p in packs for t in p.tensors()), *others)


def load_packed(ctx) -> tuple[list[Packed], tuple]:
    saved, packs, at = ctx.saved_tensors, [], 0
    for layout, count in zip(ctx.layouts, ctx.counts):
        packs.append(layout.with_tensors(saved[at: at + count]))
        at += count
    return packs, saved[at:]


def autocast_inputs(*tensors):
    """Cast to the autocast dtype, as autocast does for conv/linear/matmul, so that the Function sees (and
    packs) what the exact op would have computed with; the casts' own backward restores fp32 grads."""
    t0 = tensors[0]
    if not torch.is_autocast_enabled(t0.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(t0.device.type)
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)


def conv_backward(grad, rebuild, shape, weight, has_bias: bool, need, stride, padding, dilation, groups):
    """(grad_x, grad_weight, grad_bias) of an N-d convolution with integer zero padding; `need` says which
    to compute (None for the others). The weight and bias gradients come first, from `rebuild()` (the
    decoded or recomputed input, dropped right after); the input gradient needs only the input's `shape`
    (a one-element placeholder stands in, as in torch.nn.grad.conv2d_input), so the rebuilt input and the
    input gradient, each as large as the input, are never alive together."""
    gx = gw = gb = None
    if need[1] or (need[2] and has_bias):
        mask = [False, need[1], need[2] and has_bias]
        _, gw, gb = torch.ops.aten.convolution_backward(
            grad, rebuild(), weight, [weight.shape[0]] if mask[2] else None, stride, padding, dilation, False,
            [0] * len(stride), groups, mask)
    if need[0]:
        gx = torch.ops.aten.convolution_backward(
            grad, grad.new_empty(1).expand(shape), weight, None, stride, padding, dilation, False,
            [0] * len(stride), groups, [True, False, False])[0]
    return gx, gw, gb


def linear_backward(grad, rebuild, weight, has_bias: bool, need):
    """(grad_x, grad_weight, grad_bias) of F.linear over any leading dims; the weight gradient first, from
    `rebuild()` (dropped right after), then the input gradient, which needs only the weight."""
    rows = grad.reshape(-1, grad.shape[-1])
    gw = rows.t().mm(rebuild().reshape(-1, weight.shape[1])) if need[1] else None
    gb = rows.sum(0) if need[2] and has_bias else None
    gx = grad.matmul(weight) if need[0] else None
    return gx, gw, gb
