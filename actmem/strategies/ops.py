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
import functools
import math

import torch
import torch.nn.functional as F

from actmem.compress.packed import Packed, register_layout

_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
CPU_CHUNK = 16 << 20  # bytes of input per call in a chunked CPU backward (batch_chunks)


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


def batch_chunks(shape, dtype: torch.dtype, device: torch.device, dims: int) -> list[slice]:
    """Batch slices for the big calls of a backward. On CPU, oneDNN copies a convolution's operands into
    its blocked layout and back (in resnet50's first stage at batch 64, 245 MiB beside a 196 MiB input
    for the weight gradient, 392 MiB for a 196 MiB input gradient); calls on CPU_CHUNK bytes of input at a
    time bound those copies. The gradients equal the whole batch's to fp32 rounding (oneDNN may choose
    another algorithm for another batch size; the weight gradient is a sum over the chunks). GPUs, and
    unbatched inputs, take one call."""
    if device.type != "cpu" or len(shape) != dims + 2:
        return [slice(None)]
    rows = max(1, CPU_CHUNK // max(1, math.prod(shape[1:]) * dtype.itemsize))
    return [slice(start, start + rows) for start in range(0, max(1, shape[0]), rows)]


def in_chunks(fn, chunks: list[slice], new_empty, shape) -> torch.Tensor:
    """fn(rows) for each batch slice, written into one new tensor of `shape` (`new_empty(shape)`); with a
    single slice, fn's own result."""
    if len(chunks) == 1:
        return fn(chunks[0])
    out = new_empty(shape)
    for rows in chunks:
        out[rows] = fn(rows)
    return out


def conv_backward(grad, rebuild, shape, weight, has_bias: bool, need, stride, padding, dilation, groups):
    """(grad_x, grad_weight, grad_bias) of an N-d convolution with integer zero padding; `need` says which
    to compute (None for the others). The weight and bias gradients come first, from `rebuild()` (the
    decoded or recomputed input, dropped right after); the input gradient needs only the input's `shape`:
    it is the transposed convolution of `grad` (bit-identical to convolution_backward's on one CPU call, tested),
    so the rebuilt input and the input gradient, each as large as the input, are never alive together.
    (torch.nn.grad.conv2d_input's one-element placeholder for the input does not serve: convolution_backward
    makes it contiguous, a full-size copy.) On CPU both run on chunks of the batch (batch_chunks)."""
    gx = gw = gb = None
    if need[1] or (need[2] and has_bias):
        mask = [False, need[1], need[2] and has_bias]
        x = rebuild()
        for rows in batch_chunks(x.shape, x.dtype, x.device, len(stride)):
            _, w, b = torch.ops.aten.convolution_backward(
                grad[rows], x[rows], weight, [weight.shape[0]] if mask[2] else None, stride, padding, dilation,
                False, [0] * len(stride), groups, mask)
            gw = w if gw is None else gw.add_(w)
            gb = b if gb is None else gb.add_(b)
        del x
    if need[0]:
        dims = len(stride)
        made = [(o - 1) * s - 2 * p + d * (k - 1) + 1 for o, s, p, d, k in
                zip(grad.shape[-dims:], stride, padding, dilation, weight.shape[2:])]
        output_padding = [size - m for size, m in zip(shape[-dims:], made)]  # rows the strided conv never read
        transposed = functools.partial(_TRANSPOSED[dims], weight=weight, stride=stride, padding=padding,
                                       output_padding=output_padding, groups=groups, dilation=dilation)
        gx = in_chunks(lambda rows: transposed(grad[rows]), batch_chunks(shape, grad.dtype, grad.device, dims),
                       grad.new_empty, shape)
    return gx, gw, gb


def batch_norm_backward_(x, grad, weight, mean, invstd, need):
    """(grad_x, grad_weight, grad_bias) of training-mode batch norm, computed over x -- the decoded input,
    which the caller owns and which becomes grad_x: x_hat, then the input gradient, replace it in place.
    Against the native CPU op this keeps neither a separate input gradient nor its workspace (each as large
    as x: 392 MiB at the first stage's last BatchNorm in resnet50 at batch 64); the per-channel sums run on
    chunks of the batch. Equal to the native op's gradients to fp32 rounding (tested)."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    dims = [0, *range(2, x.dim())]
    chunks = batch_chunks(x.shape, x.dtype, x.device, x.dim() - 2)
    x_hat = x.sub_(mean.view(shape)).mul_(invstd.view(shape))
    sum_dy = grad.sum(dims)
    sum_dy_xhat = sum((grad[rows] * x_hat[rows]).sum(dims) for rows in chunks)
    gx = None
    if need[0]:
        n = x.numel() // max(1, x.shape[1])
        scale = invstd if weight is None else invstd * weight
        gx = x_hat.mul_((-sum_dy_xhat / n * scale).view(shape))
        for rows in chunks:
            gx[rows].addcmul_(grad[rows], scale.view(shape))
        gx.sub_((sum_dy / n * scale).view(shape))
    return gx, sum_dy_xhat if need[1] else None, sum_dy if need[2] else None


def linear_backward(grad, rebuild, weight, has_bias: bool, need):
    """(grad_x, grad_weight, grad_bias) of F.linear over any leading dims; the weight gradient first, from
    `rebuild()` (dropped right after), then the input gradient, which needs only the weight."""
    rows = grad.reshape(-1, grad.shape[-1])
    gw = rows.t().mm(rebuild().reshape(-1, weight.shape[1])) if need[1] else None
    gb = rows.sum(0) if need[2] and has_bias else None
    gx = grad.matmul(weight) if need[0] else None
    return gx, gw, gb
