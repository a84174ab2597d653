"""Nested forward-AD (Guo et al., arXiv 2209.10778; no public code).

For an element-wise activation σ between two layers, ... -> f1 -> σ -> f2 with f2 a Linear or Conv,
standard autograd keeps σ's input x (for σ') and its output y = σ(x) (for f2's weight gradient).
Here f2 keeps only x: its backward evaluates σ on x in forward mode -- one dual-number pass
(`torch.func.jvp` with tangent 1, or on the GPU the fused Triton kernel of
compress/triton_activation.py) that gives y and σ'(x) at once -- and uses y for dW and σ'(x) for the
input gradient. The gradient is exact (up to float rounding:
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

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from actmem.compress.backend import dispatch
from actmem.core.errors import StrategyError
from actmem.strategies.base import STRATEGIES, Claimed, Graph, replace_modules
from actmem.strategies.ops import conv_backward, linear_backward

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
    from actmem.compress import triton_activation

    return triton_activation.value_and_derivative(x, kind)


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
        gy, gw, gb = ctx.layer.op_backward(grad, y.to(grad.dtype), weight.to(grad.dtype), ctx.has_bias,
                                           ctx.needs_input_grad)
        gx = (gy * dy).to(x.dtype) if gy is not None else None
        return gx, gw if gw is None else gw.to(weight.dtype), gb if gb is None else gb.to(weight.dtype), None


class _Nested(Claimed):
    """Mixin for f2: the same module (parameters, buffers, state_dict keys shared), now also applying
    σ (`self.act`) to its input first."""

    def forward(self, x):
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(self.act(x))
        return _NestedFn.apply(x, self.weight, self.bias, self)


class NestedLinear(_Nested, nn.Linear):
    def op(self, y, weight, bias):
        return F.linear(y, weight, bias)

    def op_backward(self, grad, y, weight, has_bias, need):
        return linear_backward(grad, lambda: y, weight, has_bias, need)


class _NestedConv(_Nested):
    def op(self, y, weight, bias):
        return self._conv_forward(y, weight, bias)

    def op_backward(self, grad, y, weight, has_bias, need):
        return conv_backward(grad, lambda: y, y.shape, weight, has_bias, need, self.stride, self.padding,
                             self.dilation, self.groups)


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
    graph = Graph(model, "forward_ad", leaf=is_act)
    once = lambda n: n.op == "call_module" and graph.call_count[n.target] == 1  # noqa: E731
    pairs = []
    for n in graph.nodes:
        if not once(n) or not is_act(graph.module(n)) or len(n.users) != 1:
            continue
        (user,) = n.users
        if once(user) and _is_layer(graph.module(user)) and user.args == (n,) and not user.kwargs:
            pairs.append((n.target, user.target))
    return pairs


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
    new = {}
    for act_name, layer_name in pairs:
        act, layer = modules[act_name], modules[layer_name]
        if hasattr(act, "inplace"):
            act.inplace = False  # it now runs inside the layer, on a tensor autograd keeps
        new[layer] = NESTED[type(layer)].swap(layer)
        new[layer].act = act
        new[act] = Deferred()
    replace_modules(model, lambda name, m: m in new, new.get)
    return model
