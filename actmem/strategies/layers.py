"""Layers whose forward is the exact op and whose saved state is compressed: the parts ActNN and DIVISION
(and any strategy that only changes what autograd keeps) are built from.

- Conv1d/2d/3d, Linear (any rank), BatchNorm1d/2d/3d keep `codec.pack(input)`; backward rebuilds the
  input with `codec.unpack` and runs the exact backward op on it (`convolution_backward`, the matmuls,
  BatchNorm's own backward with the batch statistics of the forward). The gradient w.r.t. the input of
  Conv/Linear does not need the input, so it is exact; only weight gradients (and BatchNorm's input
  gradient, through x_hat) see the approximation.
- LayerNorm keeps `codec.pack(input)` and its per-row mean / rstd; Softmax `codec.pack(output)`;
  MatMul (`actmem.models.base.MatMul`, attention's two products) both operands. Their backward runs
  the exact backward ops on the rebuilt tensors.
- ReLU and Dropout keep a 1-bit mask, MaxPool2d the argmax within each window (ceil(log2(k*k)) bits);
  these are lossless, so their backward is exact.

A *codec* is what a strategy chooses per layer: `pack(x) -> Packed`, `unpack(p) -> Tensor`, and
`observe(grad_output)`, called in each backward (ActNN's adaptive bit allocation learns from it);
`ops.keep(x)` is the uncompressed Packed, for inputs a codec would only enlarge. Layers not swapped:
ConvTranspose, SyncBatchNorm, feature dropout (Dropout1d/2d/3d), and any subclass of a swapped type.
Each swapped layer is an instance of a subclass of the original class, sharing its parameters, buffers
and state_dict keys, so checkpoints load either way. Each Function saves only `packed.tensors()` with
`save_for_backward` (what `actmem.measure` counts) and never the full-precision input. In eval mode,
under no_grad, or when nothing needs a gradient, the original forward runs unchanged.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from actmem.compress.index import pack_index, pack_mask, unpack_index, unpack_mask
from actmem.compress.packed import Packed, decode
from actmem.core.errors import StrategyError
from actmem.models.base import MatMul
from actmem.strategies.base import Claimed, replace_modules
from actmem.strategies.ops import (
    autocast_inputs,
    batch_chunks,
    batch_norm_backward_,
    conv_backward,
    in_chunks,
    linear_backward,
    load_packed,
    save_packed,
)


class Codec:
    """Base codec: subclasses define `pack`; `unpack` decodes by the Packed layout."""

    def pack(self, x: torch.Tensor) -> Packed:
        raise NotImplementedError

    def unpack(self, p: Packed) -> torch.Tensor:
        return decode(p)

    def observe(self, grad_output: torch.Tensor) -> None:
        """Called in backward with the layer's output gradient; stateless codecs ignore it."""

    def state_dict(self) -> dict:
        """What a codec learned in training (ActNN L3's statistics), for checkpoints; stateless: {}."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _Swapped(Claimed):
    """Mixin for the swapped layers: `swap(module, codec=...)` builds one from an existing module."""

    codec: Codec | None = None

    def _compress(self, *inputs: torch.Tensor) -> bool:
        """Save compressed state only when training and a gradient will be computed."""
        return self.training and torch.is_grad_enabled() and (
            any(x.requires_grad for x in inputs) or any(p.requires_grad for p in self.parameters(recurse=False)))


# --- Conv --------------------------------------------------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _ConvFn(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, codec, stride, padding, dilation, groups):
        out = _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)
        save_packed(ctx, [codec.pack(x)], weight)
        ctx.codec, ctx.shape, ctx.has_bias = codec, x.shape, bias is not None
        ctx.conv = (stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad):
        ctx.codec.observe(grad)
        (packed,), (weight,) = load_packed(ctx)
        rebuild = lambda: ctx.codec.unpack(packed).reshape(ctx.shape)  # noqa: E731
        grads = conv_backward(grad, rebuild, ctx.shape, weight, ctx.has_bias, ctx.needs_input_grad, *ctx.conv)
        return *grads, None, None, None, None, None


def _conv_padding(m: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    """Integer padding (what `convolution_backward` takes); 'same' only where it is symmetric."""
    if m.padding_mode != "zeros" or m.padding == "valid":  # other modes pad with F.pad first
        return (0,) * len(m.kernel_size)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if any(t % 2 for t in total):
            raise StrategyError(f"{type(m).__name__}(padding='same') with an even kernel pads unevenly, "
                                "which the compressed layer does not reproduce; give integer padding.")
        return tuple(t // 2 for t in total)
    return tuple(m.padding)


class _CompressedConv(_Swapped):
    def forward(self, x):
        if not self._compress(x):
            return super().forward(x)
        if self.padding_mode != "zeros":  # as nn.Conv's _conv_forward: pad first, then convolve unpadded
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        x, weight, bias = autocast_inputs(x, self.weight, self.bias)
        return _ConvFn.apply(x, weight, bias, self.codec, self.stride, _conv_padding(self), self.dilation,
                             self.groups)


class CompressedConv1d(_CompressedConv, nn.Conv1d):
    pass


class CompressedConv2d(_CompressedConv, nn.Conv2d):
    pass


class CompressedConv3d(_CompressedConv, nn.Conv3d):
    pass


# --- Linear ------------------------------------------------------------------------------------------

class _LinearFn(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, codec):
        out = F.linear(x, weight, bias)
        save_packed(ctx, [codec.pack(x)], weight)
        ctx.codec, ctx.has_bias = codec, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        ctx.codec.observe(grad)
        (packed,), (weight,) = load_packed(ctx)
        rebuild = lambda: ctx.codec.unpack(packed)  # noqa: E731
        return *linear_backward(grad, rebuild, weight, ctx.has_bias, ctx.needs_input_grad), None


class CompressedLinear(_Swapped, nn.Linear):
    def forward(self, x):
        if not self._compress(x):
            return super().forward(x)
        return _LinearFn.apply(*autocast_inputs(x, self.weight, self.bias), self.codec)


# --- BatchNorm ---------------------------------------------------------------------------------------

class _BatchNormFn(Function):
    """Training-mode batch norm through the op F.batch_norm dispatches to (bit-identical output and
    running-statistics update); backward uses the forward's batch mean / inverse std with x_hat."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, codec):
        out, mean, invstd, reserve, impl = torch.ops.aten._batch_norm_impl_index(
            x, weight, bias, running_mean, running_var, True, momentum, eps, torch.backends.cudnn.enabled)
        save_packed(ctx, [codec.pack(x)], weight, mean, invstd, reserve)
        ctx.codec, ctx.shape, ctx.impl, ctx.eps = codec, x.shape, impl, eps
        return out

    @staticmethod
    def backward(ctx, grad):
        ctx.codec.observe(grad)
        (packed,), (weight, mean, invstd, reserve) = load_packed(ctx)
        x = ctx.codec.unpack(packed).reshape(ctx.shape).contiguous()
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                weight is not None and ctx.needs_input_grad[2]]
        saved = {t.untyped_storage().data_ptr() for t in packed.tensors()}
        if x.device.type == "cpu" and x.dtype == torch.float32 and x.untyped_storage().data_ptr() not in saved:
            gx, gw, gb = batch_norm_backward_(x, grad, weight, mean, invstd, mask)  # x is ours to overwrite
        else:
            gx, gw, gb = torch.ops.aten._batch_norm_impl_index_backward(
                ctx.impl, x, grad.contiguous(), weight, None, None, mean, invstd, True, ctx.eps, mask, reserve)
        return gx, gw, gb, None, None, None, None, None


class _CompressedBatchNorm(_Swapped):
    def forward(self, x):
        if not self._compress(x):
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:  # as _BatchNorm.forward
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        stats = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return _BatchNormFn.apply(x, self.weight, self.bias, *stats, momentum, self.eps, self.codec)


class CompressedBatchNorm1d(_CompressedBatchNorm, nn.BatchNorm1d):
    pass


class CompressedBatchNorm2d(_CompressedBatchNorm, nn.BatchNorm2d):
    pass


class CompressedBatchNorm3d(_CompressedBatchNorm, nn.BatchNorm3d):
    pass


# --- transformer pieces: LayerNorm, Softmax, MatMul --------------------------------------------------

class _LayerNormFn(Function):
    """F.layer_norm itself (exact training's output, and autocast picks its dtype as there); backward in
    fp32 from the rebuilt input and fp32 row statistics of the forward's input."""

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps, codec):
        out = F.layer_norm(x, normalized_shape, weight, bias, eps)
        dims = tuple(range(-len(normalized_shape), 0))
        var, mean = torch.var_mean(x.float(), dims, correction=0, keepdim=True)
        save_packed(ctx, [codec.pack(x)], weight, bias, mean, var.add_(eps).rsqrt_())
        ctx.codec, ctx.shape, ctx.normalized_shape = codec, x.shape, normalized_shape
        return out

    @staticmethod
    def backward(ctx, grad):
        ctx.codec.observe(grad)
        (packed,), (weight, bias, mean, rstd) = load_packed(ctx)
        x = ctx.codec.unpack(packed).reshape(ctx.shape).float()
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2]]
        weight, bias = (None if t is None else t.float() for t in (weight, bias))
        return (*torch.ops.aten.native_layer_norm_backward(
            grad.float().contiguous(), x, ctx.normalized_shape, mean, rstd, weight, bias, mask), None, None, None)


class CompressedLayerNorm(_Swapped, nn.LayerNorm):
    def forward(self, x):
        if not self._compress(x):
            return super().forward(x)
        return _LayerNormFn.apply(x, self.weight, self.bias, list(self.normalized_shape), self.eps, self.codec)


class _SoftmaxFn(Function):
    """Softmax keeps its output y (backward: y * (g - sum(g * y))): here compressed, backward in fp32.
    torch.softmax itself runs, so autocast picks its dtype as in exact training."""

    @staticmethod
    def forward(ctx, x, dim, codec):
        out = torch.softmax(x, dim)
        save_packed(ctx, [codec.pack(out)])
        ctx.codec, ctx.shape, ctx.dim = codec, out.shape, dim
        return out

    @staticmethod
    def backward(ctx, grad):
        ctx.codec.observe(grad)
        (packed,), _ = load_packed(ctx)
        y = ctx.codec.unpack(packed).reshape(ctx.shape).float()
        return torch.ops.aten._softmax_backward_data(grad.float(), y, ctx.dim, torch.float32), None, None


class CompressedSoftmax(_Swapped, nn.Softmax):
    """nn.Softmax with an explicit dim (the legacy implicit dim=None runs exact)."""

    def forward(self, x):
        if self.dim is None or not self._compress(x):
            return super().forward(x)
        return _SoftmaxFn.apply(x, self.dim, self.codec)


class _MatMulFn(Function):
    """a @ b for a, b of 2 or more dims (batch dims broadcast); keeps both operands compressed."""

    @staticmethod
    def forward(ctx, a, b, codec):
        save_packed(ctx, [codec.pack(a), codec.pack(b)])
        ctx.codec, ctx.shapes = codec, (a.shape, b.shape)
        return torch.matmul(a, b)

    @staticmethod
    def backward(ctx, grad):
        ctx.codec.observe(grad)
        (pa, pb), _ = load_packed(ctx)
        (a_shape, b_shape), (need_a, need_b, _) = ctx.shapes, ctx.needs_input_grad
        ga = gb = None
        if need_a:
            b = ctx.codec.unpack(pb).reshape(b_shape).to(grad.dtype)
            ga = grad.matmul(b.mT).sum_to_size(a_shape)
        if need_b:
            a = ctx.codec.unpack(pa).reshape(a_shape).to(grad.dtype)
            gb = a.mT.matmul(grad).sum_to_size(b_shape)
        return ga, gb, None


class CompressedMatMul(_Swapped, MatMul):
    def forward(self, a, b):
        if a.dim() < 2 or b.dim() < 2 or not self._compress(a, b):
            return super().forward(a, b)
        return _MatMulFn.apply(*autocast_inputs(a, b), self.codec)


# --- lossless: ReLU / Dropout masks, max-pool index ------------------------------------------------------

class _MaskFn(Function):
    """Backward of an op whose derivative is `ctx.scale` where a 1-bit mask is set and 0 elsewhere."""

    @staticmethod
    def backward(ctx, grad):
        (packed,), _ = load_packed(ctx)
        mask = unpack_mask(packed)
        # grad * mask: on CPU ~7x faster than torch.where (NaN grads stay NaN); the CPU casts the mask to
        # grad's dtype first, so it runs on chunks of the batch
        chunks = batch_chunks(grad.shape, grad.dtype, grad.device, max(grad.dim() - 2, 0))
        gx = in_chunks(lambda rows: grad[rows] * mask[rows], chunks, grad.new_empty, grad.shape)
        return (gx if ctx.scale == 1 else gx.mul_(ctx.scale)), None, None


class _ReLUFn(_MaskFn):
    @staticmethod
    def forward(ctx, x, inplace):
        if inplace:
            ctx.mark_dirty(x)
        out = x.relu_() if inplace else torch.relu(x)
        save_packed(ctx, [pack_mask(out > 0)])
        ctx.scale = 1.0
        return out


class _DropoutFn(_MaskFn):
    @staticmethod
    def forward(ctx, x, p, inplace):
        if inplace:
            ctx.mark_dirty(x)
        out, keep = dropout_noise(x, p, inplace)
        save_packed(ctx, [pack_mask(keep)])
        ctx.scale = 1.0 / (1.0 - p)
        return out


def dropout_noise(x: torch.Tensor, p: float, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, keep mask) of training-mode F.dropout(x, p, inplace=inplace), from the same random
    numbers: torch's fused `native_dropout` where it uses it (out-of-place on CUDA/XPU), else its
    `bernoulli_(1 - p) / (1 - p)` noise multiplied in."""
    if not inplace and x.device.type in ("cuda", "xpu"):
        return torch.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return (x.mul_(noise) if inplace else x * noise), noise != 0


class MaskedReLU(_Swapped, nn.ReLU):
    """ReLU keeping out > 0 as one bit per element."""

    def forward(self, x):
        if not self._compress(x):
            return super().forward(x)
        return _ReLUFn.apply(x, self.inplace)


class MaskedDropout(_Swapped, nn.Dropout):
    """Dropout keeping its keep-mask as one bit per element."""

    def forward(self, x):
        if not self._compress(x) or not 0 < self.p < 1 or x.numel() == 0:
            return super().forward(x)
        return _DropoutFn.apply(x, self.p, self.inplace)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _window_origin(out_hw, stride, padding, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row [OH, 1] and column [1, OW] of the top-left input position of each output's window."""
    (oh, ow), (sh, sw), (ph, pw) = out_hw, stride, padding
    rows = torch.arange(oh, device=device).mul_(sh).sub_(ph).view(oh, 1)
    cols = torch.arange(ow, device=device).mul_(sw).sub_(pw).view(1, ow)
    return rows, cols


class _MaxPool2dFn(Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        out, index = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        (kh, kw), (dh, dw), width = kernel, dilation, x.shape[-1]
        row0, col0 = _window_origin(out.shape[-2:], stride, padding, x.device)
        krow = (index.div(width, rounding_mode="floor") - row0).div_(dh, rounding_mode="floor")
        kcol = (index.remainder(width) - col0).div_(dw, rounding_mode="floor")
        code = krow.mul_(kw).add_(kcol).to(torch.uint8)
        save_packed(ctx, [pack_index(code, max(1, (kh * kw - 1).bit_length()))])
        ctx.geometry = (x.shape, kw, stride, padding, dilation)
        return out

    @staticmethod
    def backward(ctx, grad):
        (packed,), _ = load_packed(ctx)
        shape, kw, stride, padding, (dh, dw) = ctx.geometry
        local = unpack_index(packed).long()
        row0, col0 = _window_origin(grad.shape[-2:], stride, padding, grad.device)
        rows = local.div(kw, rounding_mode="floor").mul_(dh).add_(row0)
        flat = rows.mul_(shape[-1]).add_(local.remainder(kw).mul_(dw)).add_(col0)
        planes = grad.numel() // (grad.shape[-2] * grad.shape[-1])
        gx = grad.new_zeros(planes, shape[-2] * shape[-1])
        gx.scatter_add_(1, flat.reshape(planes, -1), grad.reshape(planes, -1))
        return gx.view(shape), None, None, None, None, None


class IndexedMaxPool2d(_Swapped, nn.MaxPool2d):
    """Max pooling keeping the argmax's position inside its window (4 bits for 3x3) instead of the input."""

    def forward(self, x):
        if not self._compress(x) or self.return_indices:
            return super().forward(x)
        stride = self.stride if self.stride is not None else self.kernel_size
        return _MaxPool2dFn.apply(x, _pair(self.kernel_size), _pair(stride), _pair(self.padding),
                                  _pair(self.dilation), self.ceil_mode)


# --- what to swap --------------------------------------------------------------------------------------

CONV_LINEAR = {nn.Conv1d: CompressedConv1d, nn.Conv2d: CompressedConv2d, nn.Conv3d: CompressedConv3d,
               nn.Linear: CompressedLinear}
BATCHNORM = {nn.BatchNorm1d: CompressedBatchNorm1d, nn.BatchNorm2d: CompressedBatchNorm2d,
             nn.BatchNorm3d: CompressedBatchNorm3d}
TRANSFORMER = {nn.LayerNorm: CompressedLayerNorm, nn.Softmax: CompressedSoftmax, MatMul: CompressedMatMul}
LOSSLESS = {nn.ReLU: MaskedReLU, nn.Dropout: MaskedDropout, nn.MaxPool2d: IndexedMaxPool2d}
SWAPS = {**CONV_LINEAR, **BATCHNORM, **TRANSFORMER, **LOSSLESS}


def swap_layers(model: nn.Module, codec_for: Callable[[str, nn.Module], Codec | None],
                lossless: bool = True) -> list[str]:
    """Swap each Conv/Linear/BatchNorm/LayerNorm/Softmax/MatMul for which `codec_for(name, module)`
    gives a codec (None: leave it exact) and, if `lossless`, each ReLU/Dropout/MaxPool2d. Types must
    match exactly (a subclass may have its own forward: it is left alone); claimed modules are skipped.
    Returns the names swapped."""
    codecs = {}

    def select(name, m):
        if type(m) in LOSSLESS:
            codecs[id(m)] = None
            return lossless
        if type(m) not in SWAPS:
            return False
        codecs[id(m)] = codec = codec_for(name, m)
        if codec is not None and isinstance(m, nn.modules.conv._ConvNd):
            _conv_padding(m)  # refuse an asymmetric 'same' now, not in the first training step
        return codec is not None

    return replace_modules(model, select, lambda m: SWAPS[type(m)].swap(m, codec=codecs[id(m)]))
