"""BLPA: BatchNorm -> ReLU -> Conv chains keep a K-bit code of the pre-activation and nothing else.

After Chakrabarti & Moseley, "Backprop with Approximate Activations for Memory-efficient Network
Training" (NeurIPS 2019), and the official TensorFlow code (ayanc/blpa, blpa/graph.py and quant.py).
For every chain z = BN(x), y = ReLU(z), out = Conv(y) (y may feed several convs, e.g. a pre-activation
block's conv1 and its projection shortcut, and anything that saves nothing, e.g. the residual add),
autograd keeps only
- the K-bit code (K = 4 or 8) of u = z / |gamma| on the fixed grid of `compress.grid` (step 6 / 2**K
  in batch-std units, u = 0 a bin edge; decoded to bin midpoints), shared by the BN and every conv;
- the BN's per-channel 1/std (fp32).
The grid spans about beta/|gamma| +- 3 (in std units) but always keeps a bin on each side of u = 0, as
in the original: values beyond the span, and every value on the far side of a channel whose
|beta/gamma| exceeds 3, saturate to the end bins (the mask stays exact).
Backward: each conv rebuilds its input as |gamma| * ReLU(u_hat) for the weight gradient; its input
gradient needs only the weight, so it is exact. The ReLU mask is the code's sign, exact. BN's backward
runs with the approximate x_hat = sign(gamma) * (u_hat - beta / |gamma|) and the exact 1/std. No
rounding is random. The forward is the original modules' own ops, bit for bit: BN's output (and its
running statistics) come from the module's own forward, ReLU and conv are the same functions.

Chains are found by tracing the model with torch.fx, so every BN -> ReLU -> Conv2d is served wherever
it occurs (pre-activation ResNets and WRNs throughout; in post-activation ResNets bn1 -> relu -> conv2
inside each block and the stem's BN -> ReLU where a block conv follows). The first conv (its input is
the image) and the classifier (its input comes through the final BN -> ReLU -> pooling) stay exact, as
in the original, whose last layer keeps its input in fp32. torchvision ResNets call one in-place
`self.relu` at three places: it is served, by a ReLU that lets an already coded (rectified) tensor pass
and is the original in-place ReLU everywhere else.

Deviations from the official code, each to keep the model and its forward unchanged:
- The official code clamps gamma to >= 1e-8 inside the model; here gamma is what it is, and u is
  BN(x) / |gamma| = sign(gamma) * x_hat + beta / |gamma| (the paper's u = x_hat + beta / gamma when
  gamma > 0), whose sign is ReLU's mask for either sign of gamma. gamma == 0 loses x_hat altogether:
  refused with StrategyError at apply time and in any training forward (a one-element check per layer,
  which is a host sync on GPU).
- u is computed from the BN's own output rather than from x, so the recovered mask is the mask of the
  forward's ReLU, bit for bit; the grid's bins are (k*D, (k+1)*D] instead of floor(u - 1e-6) (grid.py).
- The official ResNet-164 uses parameter-free (pool + zero-pad) shortcuts; ours has projection convs on
  the pre-activated tensor, which share the block's code.
- Only Conv2d with zero, integer padding joins a chain (others stay exact); chains are BatchNorm2d
  (affine) -> nn.ReLU module -> Conv2d module: a functional relu, or a Dropout between ReLU and conv
  (wrn28_10 with dropout > 0), leaves that BN exact.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from actmem.compress.grid import grid_dequantize, grid_quantize
from actmem.compress.packed import Packed
from actmem.core.errors import ConfigError, StrategyError
from actmem.strategies.base import STRATEGIES, Claimed, Graph, replace_modules
from actmem.strategies.ops import autocast_inputs, conv_backward, load_packed, save_packed

BITS = (4, 8)


@dataclass
class BlpaConfig:
    name: str = "blpa"
    bits: int = 4  # K, the code width: 4 or 8 (the paper's two settings)


# --- the code a BN+ReLU output carries to its consumers ------------------------------------------------

@dataclass(frozen=True)
class _Code:
    """Attached to a BLPA BN+ReLU output as an attribute, so it goes exactly where that tensor goes."""
    packed: Packed
    gamma: torch.Tensor  # the BN weight (a parameter, not an activation)
    version: int  # the tensor's version when coded: an in-place change since then voids the code


_ATTR = "_blpa_code"


def _code_of(x: torch.Tensor) -> _Code | None:
    code = getattr(x, _ATTR, None)
    return code if code is not None and code.version == x._version else None


def _channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-channel [C] as [1, C, 1, ...], to broadcast against `like`."""
    return t.view(1, -1, *[1] * (like.dim() - 2))


def _decode_u(packed: Packed) -> torch.Tensor:
    """u_hat in fp32, whatever the activation dtype (it feeds sums over the whole batch)."""
    return grid_dequantize(dataclasses.replace(packed, dtype=torch.float32))


def rebuild_input(packed: Packed, gamma: torch.Tensor) -> torch.Tensor:
    """The conv input ReLU(BN(x)) = |gamma| * ReLU(u), from the code (fp32)."""
    u = _decode_u(packed)
    return u.relu_().mul_(_channel(gamma.detach().abs().float(), u))


# --- autograd ---------------------------------------------------------------------------------------------

class _BatchNormReLUFn(Function):
    """y = ReLU(z) for z = BN(x) computed by the caller; backward from the code and 1/std alone."""

    @staticmethod
    def forward(ctx, x, weight, bias, z, packed, invstd):
        save_packed(ctx, [packed], invstd, weight, bias)
        return torch.relu(z)

    @staticmethod
    def backward(ctx, grad_y):
        (packed,), (invstd, weight, bias) = load_packed(ctx)
        u = _decode_u(packed)
        g = torch.where(u > 0, grad_y.float(), 0.0)  # bin midpoints are never 0: u_hat > 0 is ReLU's mask
        gamma, beta = weight.float(), bias.float()
        x_hat = u.sub_(_channel(beta / gamma.abs(), u)).mul_(_channel(gamma.sign(), u))
        dims = [0, *range(2, u.dim())]
        n = u.numel() // u.shape[1]
        grad_beta = g.sum(dims)
        grad_gamma = (g * x_hat).sum(dims)
        grad_x = g.sub_(_channel(grad_beta / n, g)).sub_(x_hat.mul_(_channel(grad_gamma / n, g)))
        grad_x.mul_(_channel(gamma * invstd, g))
        return grad_x.to(grad_y.dtype), grad_gamma, grad_beta, None, None, None


class _ConvFromCodeFn(Function):
    """Conv whose input is a coded BN+ReLU output: saves nothing of its own but the shared code."""

    @staticmethod
    def forward(ctx, x, weight, bias, code, stride, padding, dilation, groups):
        save_packed(ctx, [code.packed], weight, code.gamma.detach())
        ctx.conv, ctx.has_bias, ctx.shape = (stride, padding, dilation, groups), bias is not None, x.shape
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (packed,), (weight, gamma) = load_packed(ctx)
        rebuild = lambda: rebuild_input(packed, gamma).to(weight.dtype)  # noqa: E731
        grads = conv_backward(grad, rebuild, ctx.shape, weight, ctx.has_bias, ctx.needs_input_grad, *ctx.conv)
        return *grads, *[None] * 5


# --- the swapped modules ----------------------------------------------------------------------------------

class BlpaBatchNorm2d(Claimed, nn.BatchNorm2d):
    """BatchNorm fused with the ReLU after it (in training): returns ReLU(BN(x)) carrying its code."""

    bits: int

    def forward(self, x):
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)  # the ReLU module after it rectifies
        if not self.weight.all():
            raise StrategyError(_zero_gamma_message([self.weight], ["this BatchNorm2d"]))
        with torch.no_grad():
            z = super().forward(x)  # the module's own op and running-statistics update: bit-identical
            gamma = self.weight.abs()
            packed = grid_quantize(z, gamma.reciprocal(), torch.zeros_like(gamma), self.bits,
                                   center=self.bias / gamma)
            dims = [0, *range(2, x.dim())]
            invstd = torch.var(x.float(), dims, correction=0).add_(self.eps).rsqrt_()
        y = _BatchNormReLUFn.apply(x, self.weight, self.bias, z, packed, invstd)
        setattr(y, _ATTR, _Code(packed, self.weight, y._version))
        return y


class BlpaReLU(Claimed, nn.ReLU):
    """ReLU that lets a coded BN+ReLU output through untouched (rectifying it again would save it in
    full precision), and is the original ReLU, in place or not, on anything else."""

    def forward(self, x):
        return x if _code_of(x) is not None else super().forward(x)


class BlpaConv2d(Claimed, nn.Conv2d):
    """Conv2d that, given a coded input, keeps only the shared code; otherwise the original conv."""

    def forward(self, x):
        code = _code_of(x)
        if code is None or not torch.is_grad_enabled():
            return super().forward(x)
        x, weight, bias = autocast_inputs(x, self.weight, self.bias)
        return _ConvFromCodeFn.apply(x, weight, bias, code, self.stride, self.padding, self.dilation, self.groups)


# --- finding the chains -------------------------------------------------------------------------------------

def _servable_conv(conv: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def find_chains(model: nn.Module) -> dict[str, tuple[set[str], set[str]]]:
    """{BN name: (its ReLU module names, the Conv2d names fed by them)} for every BatchNorm2d all of
    whose calls feed only an nn.ReLU module whose output feeds at least one servable Conv2d."""
    graph = Graph(model, "blpa")

    def chain(bn_node):
        users = list(bn_node.users)
        if len(users) != 1 or not graph.calls(users[0], [nn.ReLU]):
            return None
        relu = users[0]
        convs = {u.target for u in relu.users
                 if graph.calls(u, [nn.Conv2d]) and u.args == (relu,) and _servable_conv(graph.module(u))}
        return (relu.target, convs) if convs else None

    found: dict[str, list] = {}
    for node in graph.nodes:
        if graph.calls(node, [nn.BatchNorm2d]) and graph.module(node).affine:
            found.setdefault(node.target, []).append(chain(node))
    return {bn: ({c[0] for c in cs}, set().union(*(c[1] for c in cs)))
            for bn, cs in found.items() if all(cs)}  # a BN called twice is fused only if both calls chain


def _zero_gamma_message(gammas, names) -> str:
    bad = [f"{n} ({int((g == 0).sum())} of {g.numel()} channels)" for g, n in zip(gammas, names) if not g.all()]
    return (f"blpa cannot serve a BatchNorm with gamma == 0: it keeps u = BN(x) / |gamma|, from which x_hat "
            f"(needed for gamma's gradient) is lost when gamma is 0. Found in {', '.join(bad)}. Initialise "
            "gamma non-zero (e.g. model.kwargs.zero_init_residual=false), or use strategy=actnn or "
            "strategy=division.")


def check_blpa(cfg) -> None:
    if cfg.bits not in BITS:
        raise ConfigError(f"strategy.bits={cfg.bits}: BLPA codes activations at {' or '.join(map(str, BITS))} "
                          "bits (the paper's settings).")


@STRATEGIES.register("blpa", schema=BlpaConfig, check=check_blpa)
def apply_blpa(model: nn.Module, cfg) -> nn.Module:
    chains = find_chains(model)
    if not chains:
        raise StrategyError(
            f"blpa found no BatchNorm2d -> ReLU -> Conv2d chain in {type(model).__name__}: it compresses only "
            "the input of such chains (pre-activation ResNets such as preact_resnet56/164 and wrn28_10; "
            "bn1 -> relu -> conv2 in resnet18/20/50). Use strategy=actnn or strategy=division for this model.")
    gammas = [model.get_submodule(bn).weight for bn in chains]
    if not all(g.all() for g in gammas):
        raise StrategyError(_zero_gamma_message(gammas, list(chains)))
    bns = set(chains)
    relus = set().union(*(r for r, _ in chains.values()))
    convs = set().union(*(c for _, c in chains.values()))
    swaps = {nn.BatchNorm2d: lambda m: BlpaBatchNorm2d.swap(m, bits=cfg.bits), nn.ReLU: BlpaReLU.swap,
             nn.Conv2d: BlpaConv2d.swap}
    replace_modules(model, lambda name, m: name in bns | relus | convs, lambda m: swaps[type(m)](m))
    return model
