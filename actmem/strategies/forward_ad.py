"""Nested forward-AD (Guo et al., arXiv 2209.10778; no public code).

For an element-wise activation σ between two layers, ... -> f1 -> σ -> f2 with f2 a Linear or Conv,
standard autograd keeps σ's input x (for σ') and its output y = σ(x) (for f2's weight gradient).
Here f2 keeps only x: its backward evaluates σ on x in forward mode -- one dual-number pass
(`torch.func.jvp` with tangent 1, or a fused Triton kernel on the GPU) that gives y and σ'(x) at once
-- and uses y for dW and σ'(x) for the input gradient. The gradient is exact (up to float rounding:
σ' comes from the forward-mode formula rather than the backward one).

σ -> f2 pairs are found by torch.fx tracing: σ a module of an element-wise type, called once, whose
output feeds only f2, a Linear or zero-padded Conv1d/2d/3d module called once. σ is replaced by an
identity (`Deferred`) and f2 by the same layer computing f2(σ(x)) (`NestedLinear`/`NestedConv*d`,
sharing f2's parameters and state_dict keys). Pairs found in our models: vit_tiny: every block's
fc1 -> GELU -> fc2 (12); convnext_tiny: every block's Linear -> GELU -> Linear (18); efficientnet_b0:
the SiLU after each expansion conv -> depthwise conv (15) and the SiLU inside each squeeze-excitation
-> its second 1x1 conv (16), plus the stem's SiLU -> first depthwise conv (1).

Deviations and choices:
- ReLU, Tanh and Sigmoid are not fused: autograd keeps their *output*, the same tensor f2 keeps, so
  keeping x instead would save nothing. Other modules can be declared element-wise by class name
  (`strategy.elementwise=[Swish]`): e.g. activations written in primitives, where autograd keeps
  several intermediates and forward_ad still keeps only x.
- In-place activations run out of place inside the fused layer (same values).
- Recomputation in backward costs one extra evaluation of σ (element-wise, memory-bound); no matmul
  or convolution is recomputed.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from actmem.compress.backend import dispatch
from actmem.errors import StrategyError
from actmem.strategies.base import STRATEGIES, Claimed

# Element-wise activations whose autograd keeps their input: fusing them with f2 saves y.
ACTIVATIONS = (nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.ELU, nn.CELU, nn.SELU, nn.Hardswish,
               nn.Hardsigmoid, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.LogSigmoid, nn.Softsign)


@dataclass
class ForwardADConfig:
    name: str = "forward_ad"
    elementwise: list[str] = field(default_factory=list)  # extra module class names to treat as σ


def kernel_kind(act: nn.Module) -> str | None:
    """The fused Triton kernel's name for σ, None where only the torch path serves it."""
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    return {nn.SiLU: "silu", nn.Mish: "mish"}.get(type(act))


def value_and_derivative(act: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ(x), σ'(x)) in one forward-mode pass."""
    kind = kernel_kind(act)
    if kind is None:
        return _jvp(act, x, kind)
    return dispatch(x, _fused, _jvp, act, x, kind)


def _fused(act: nn.Module, x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Imported here: Triton decides when a kernel is defined whether to interpret it (tests on CPU).
    from actmem.strategies import forward_ad_kernel

    return forward_ad_kernel.value_and_derivative(x, kind)


def _jvp(act: nn.Module, x: torch.Tensor, kind: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.func.jvp(act, (x,), (torch.ones_like(x),))


class _NestedFn(torch.autograd.Function):
    """out = layer_op(σ(x), weight, bias), keeping x (and the weight, a parameter) only."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.has_bias = layer, bias is not None
        ctx.amp = (x.device.type, torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        return layer.op(layer.act(x), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        device, amp, amp_dtype = ctx.amp
        with torch.autocast(device, dtype=amp_dtype, enabled=amp):  # σ as the forward computed it
            y, dy = value_and_derivative(ctx.layer.act, x)
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        gy, gw, gb = ctx.layer.op_backward(grad, y.to(grad.dtype), weight.to(grad.dtype), need)
        gx = (gy * dy).to(x.dtype) if gy is not None else None
        return gx, gw if gw is None else gw.to(weight.dtype), gb if gb is None else gb.to(weight.dtype), None


class _Nested(Claimed):
    """Mixin for f2: the same module (parameters, buffers, state_dict keys shared), now also applying
    σ (`self.act`) to its input first."""

    @classmethod
    def swap(cls, layer: nn.Module, act: nn.Module):
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        new._modules = {**layer._modules, "act": act}
        if hasattr(act, "inplace"):
            act.inplace = False
        return new

    def forward(self, x):
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(self.act(x))
        return _NestedFn.apply(x, self.weight, self.bias, self)


class NestedLinear(_Nested, nn.Linear):
    def op(self, y, weight, bias):
        return F.linear(y, weight, bias)

    def op_backward(self, grad, y, weight, need):
        g2 = grad.reshape(-1, grad.shape[-1])
        gy = grad.matmul(weight) if need[0] else None
        gw = g2.t().mm(y.reshape(-1, y.shape[-1])) if need[1] else None
        gb = g2.sum(0) if need[2] else None
        return gy, gw, gb


class _NestedConv(_Nested):
    def op(self, y, weight, bias):
        return self._conv_forward(y, weight, bias)

    def op_backward(self, grad, y, weight, need):
        bias_sizes = [weight.shape[0]] if need[2] else None
        return torch.ops.aten.convolution_backward(grad, y, weight, bias_sizes, self.stride, self.padding,
                                                   self.dilation, False, [0] * len(self.stride), self.groups, need)


class NestedConv1d(_NestedConv, nn.Conv1d):
    pass


class NestedConv2d(_NestedConv, nn.Conv2d):
    pass


class NestedConv3d(_NestedConv, nn.Conv3d):
    pass


NESTED = {nn.Linear: NestedLinear, nn.Conv1d: NestedConv1d, nn.Conv2d: NestedConv2d, nn.Conv3d: NestedConv3d}


class Deferred(Claimed, nn.Module):
    """Stands where σ was: passes x on, the next layer applies σ."""

    def forward(self, x):
        return x


def _is_layer(m: nn.Module) -> bool:
    return type(m) in NESTED and not (isinstance(m, nn.modules.conv._ConvNd) and (
        m.padding_mode != "zeros" or isinstance(m.padding, str)))


def find_pairs(model: nn.Module, elementwise=()) -> list[tuple[str, str]]:
    """(σ name, f2 name) of every σ -> f2 pair that can be fused, in graph order (torch.fx tracing)."""
    is_act = lambda m: type(m) in ACTIVATIONS or type(m).__name__ in elementwise  # noqa: E731

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, Claimed) or is_act(m) or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 -- any tracing failure means: no pairs can be found this way
        raise StrategyError(f"forward_ad finds σ -> Linear/Conv pairs by torch.fx tracing, which failed on "
                            f"{type(model).__name__}: {type(e).__name__}: {e}. Use strategy=fewbit or "
                            "checkpoint for this model.") from None
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for n in graph.nodes:
        if n.op != "call_module" or calls[n.target] != 1 or not is_act(modules[n.target]) or len(n.users) != 1:
            continue
        (user,) = n.users
        if (user.op == "call_module" and calls[user.target] == 1 and _is_layer(modules[user.target])
                and user.args == (n,) and not user.kwargs):
            pairs.append((n.target, user.target))
    return pairs


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


@STRATEGIES.register("forward_ad", schema=ForwardADConfig)
def apply_forward_ad(model: nn.Module, cfg) -> nn.Module:
    pairs = find_pairs(model, tuple(cfg.elementwise))
    if not pairs:
        raise StrategyError(
            f"forward_ad found no activation -> Linear/Conv pair in {type(model).__name__}: it needs an "
            f"activation module ({', '.join(t.__name__ for t in ACTIVATIONS)}, or a class named in "
            "strategy.elementwise) whose output feeds only a Linear/Conv module. ReLU/Tanh/Sigmoid gain "
            "nothing from it (autograd already keeps only their output); try strategy=fewbit or actnn.")
    modules = dict(model.named_modules())
    for act_name, layer_name in pairs:
        layer = modules[layer_name]
        _set(model, layer_name, NESTED[type(layer)].swap(layer, modules[act_name]))
        _set(model, act_name, Deferred())
    return model
