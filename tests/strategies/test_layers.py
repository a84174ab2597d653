"""The shared compressed layers: exact forward, exact backward given a lossless codec, the codec's
output really used, and nothing but the packed state saved."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from actmem.compress.packed import Packed
from actmem.measure import saved_bytes_by_module
from actmem.models.base import MatMul
from actmem.strategies.layers import Codec, CompressedSoftmax, swap_layers
from actmem.strategies.ops import keep


class KeepCodec(Codec):
    """Lossless: keeps x uncompressed (so gradients must equal exact's); counts its calls."""

    def __init__(self):
        self.packed = self.observed = 0

    def pack(self, x):
        self.packed += 1
        return keep(x)

    def observe(self, grad_output):
        self.observed += 1


class ZeroCodec(Codec):
    """Keeps nothing but the shape: backward sees x_hat = 0."""

    def pack(self, x):
        return Packed(torch.zeros(0, dtype=torch.uint8), (), x.shape, x.dtype, 0, "test-zero")

    def unpack(self, p):
        return torch.zeros(p.shape, dtype=p.dtype)


def _swapped(model, codec):
    twin = copy.deepcopy(model)
    names = swap_layers(twin, lambda name, m: codec)
    assert names, "nothing swapped"
    return twin


def _grads(model, x, seed=0):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x)
    torch.manual_seed(1)
    out.backward(torch.randn_like(out))
    return out, x.grad, {n: p.grad for n, p in model.named_parameters()}


class TinyAttention(nn.Module):
    """LayerNorm -> q, k, v -> softmax(q k^T) v, with v shared across the batch (broadcast in MatMul)."""

    def __init__(self, dim: int = 6):
        super().__init__()
        self.norm, self.qkv = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim)
        self.scores, self.softmax, self.mix = MatMul(), nn.Softmax(dim=-1), MatMul()

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        return self.mix(self.softmax(self.scores(q, k.mT)), v[:1])


CASES = {
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 4, 3, padding=2, dilation=2, groups=4, bias=False)),
               (4, 3, 11, 9)),
    "conv1d_reflect": (lambda: nn.Sequential(nn.Conv1d(3, 6, 5, padding=2, padding_mode="reflect"),
                                             nn.BatchNorm1d(6), nn.ReLU(inplace=True)), (3, 3, 17)),
    "conv3d_same": (lambda: nn.Sequential(nn.Conv3d(2, 4, 3, padding="same"), nn.BatchNorm3d(4)),
                    (2, 2, 5, 6, 7)),
    "linear_rank3": (lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 5)),
                     (3, 7, 12)),
    "bn1d_no_affine_cumulative": (lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, affine=False,
                                                                                         momentum=None)),
                                  (9, 5)),
    "attention": (TinyAttention, (3, 5, 6)),
    "layernorm_2d_no_affine": (lambda: nn.Sequential(nn.Linear(4, 12), nn.Unflatten(-1, (3, 4)),
                                                      nn.LayerNorm((3, 4), elementwise_affine=False)), (5, 4)),
    "maxpool": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d(3, 2, 1)), (2, 3, 10, 11)),
    "maxpool_ceil_dilated": (lambda: nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.MaxPool2d((2, 3), (2, 1), (1, 1), dilation=(2, 1), ceil_mode=True)),
                             (2, 3, 9, 8)),
}


@pytest.mark.parametrize("case", CASES)
def test_lossless_codec_gives_exact_forward_gradients_and_stats(case):
    make, shape = CASES[case]
    torch.manual_seed(0)
    exact = make()
    codec = KeepCodec()
    twin = _swapped(exact, codec)
    x = torch.randn(shape)
    out_e, gx_e, g_e = _grads(exact, x)
    out_c, gx_c, g_c = _grads(twin, x)
    assert torch.equal(out_e, out_c)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-5, atol=1e-6)
    for n in g_e:
        torch.testing.assert_close(g_c[n], g_e[n], rtol=1e-5, atol=1e-6, msg=n)
    for (n, be), bc in zip(exact.named_buffers(), twin.buffers()):
        assert torch.equal(be, bc), n
    matmuls = sum(isinstance(m, MatMul) for m in twin.modules())  # each packs both operands, once called
    assert codec.packed > 0 and codec.observed == codec.packed - matmuls
    assert twin.state_dict().keys() == exact.state_dict().keys()
    exact.eval(), twin.eval()
    assert torch.equal(exact(x), twin(x))


def test_backward_uses_the_codec_output():
    """With x_hat = 0 the weight gradient of a bias-free conv is zero, its input gradient still exact."""
    torch.manual_seed(0)
    exact = nn.Conv2d(3, 4, 3, bias=False)
    twin = _swapped(nn.Sequential(exact), ZeroCodec())[0]
    x = torch.randn(2, 3, 6, 6)
    _, gx_e, _ = _grads(exact, x)
    _, gx_c, g_c = _grads(twin, x)
    assert torch.count_nonzero(g_c["weight"]) == 0
    torch.testing.assert_close(gx_c, gx_e)


def test_only_packed_state_is_saved():
    """A codec that keeps nothing: BN keeps its per-channel mean/invstd, ReLU a 1-bit mask, the
    max-pool a 4-bit index; no full-size tensor anywhere."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
              nn.Flatten(), nn.Linear(8 * 16 * 16, 10)]
    model = _swapped(nn.Sequential(*layers), ZeroCodec())
    x = torch.randn(4, 3, 32, 32)
    saved = saved_bytes_by_module(model, x)
    elements = 4 * 8 * 32 * 32
    assert saved["2"] == elements // 8  # ReLU: 1 bit per element
    assert saved["3"] == elements // 4 * 4 // 8  # 3x3 max-pool: 4 bits per output (a quarter of them)
    assert saved["1"] == 2 * 8 * 4  # BN: mean and inverse std, fp32
    assert "0" not in saved and "5" not in saved


def test_plain_path_in_eval_and_no_grad():
    codec = KeepCodec()
    model = _swapped(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), codec)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    model.eval()
    model(x.requires_grad_())
    assert codec.packed == 0


def test_dropout_draws_the_same_random_numbers():
    x = torch.randn(64, 100, requires_grad=True)
    drop = nn.Dropout(0.4)
    twin = _swapped(nn.Sequential(drop), KeepCodec())
    torch.manual_seed(3)
    out_e, after_e = drop(x), torch.rand(4)
    torch.manual_seed(3)
    out_c, after_c = twin(x), torch.rand(4)
    assert torch.equal(out_e, out_c) and torch.equal(after_e, after_c)
    out_c.backward(torch.ones_like(out_c))
    kept = out_e != 0  # x has no zeros, so this is the keep mask
    torch.testing.assert_close(x.grad, kept / 0.6)


def test_subclass_and_claimed_modules_are_left_alone():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(3, 3, 1), nn.Conv2d(3, 3, 1))
    assert swap_layers(model, lambda n, m: KeepCodec()) == ["1"]
    assert swap_layers(model, lambda n, m: KeepCodec()) == []  # already swapped: claimed


def test_transformer_pieces_save_only_packed_state():
    """A codec that keeps nothing: LayerNorm keeps its row mean / rstd, Softmax and MatMul nothing."""
    model = _swapped(TinyAttention(), ZeroCodec())
    saved = saved_bytes_by_module(model, torch.randn(4, 5, 6))
    assert saved == {"norm": 2 * 4 * 5 * 4}  # fp32 mean and rstd per row; qkv's weight is a parameter


def test_softmax_with_implicit_dim_runs_the_plain_op():
    """Softmax with the legacy implicit dim runs the plain op (no dim to give its backward)."""
    codec = KeepCodec()
    model = _swapped(nn.Sequential(nn.Linear(4, 4), nn.Softmax()), codec)
    assert isinstance(model[1], CompressedSoftmax)
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = torch.softmax(model[0](x), 1)
    with pytest.warns(UserWarning):
        out = model(x)
    assert torch.equal(out, expected)
    assert codec.packed == 1  # the Linear's input only: the softmax kept its output the plain way


@pytest.mark.parametrize("case", ["conv2d", "linear_rank3", "attention"])
def test_autocast_forward_is_exact(case):
    """Under autocast the layers cast as autocast does (and pack the low-precision input)."""
    make, shape = CASES[case]
    torch.manual_seed(0)
    exact = make()
    twin = _swapped(exact, KeepCodec())
    x = torch.randn(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_e, gx_e, g_e = _grads(exact, x)
        out_c, gx_c, g_c = _grads(twin, x)
    assert out_c.dtype == torch.bfloat16 and torch.equal(out_e, out_c)
    for n in g_e:
        assert g_c[n].dtype == torch.float32
        torch.testing.assert_close(g_c[n], g_e[n], rtol=2e-2, atol=2e-2, msg=n)  # bf16 roundings


@pytest.mark.parametrize("dims, shape, kernel, stride, padding, dilation, groups", [
    (2, (4, 6, 11, 9), 3, 2, 1, 1, 1), (2, (2, 8, 10, 10), 3, 1, 2, 2, 4), (1, (3, 4, 17), 5, 3, 2, 1, 2),
    (3, (2, 2, 5, 6, 7), 3, 2, 1, 1, 1)])
def test_the_input_gradient_is_convolution_backwards_bit_for_bit(dims, shape, kernel, stride, padding, dilation,
                                                                   groups):
    """conv_backward makes the input gradient as a transposed convolution (no input needed); it must be
    the very tensor convolution_backward makes from the input."""
    from actmem.strategies.ops import conv_backward

    torch.manual_seed(0)
    x = torch.randn(shape)
    weight = torch.randn(shape[1] * 2 // groups * groups, shape[1] // groups, *[kernel] * dims)
    conv = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}[dims]
    grad = torch.randn_like(conv(x, weight, None, stride, padding, dilation, groups))
    conv_args = ([stride] * dims, [padding] * dims, [dilation] * dims)
    gx, _, _ = conv_backward(grad, lambda: x, x.shape, weight, False, (True, False, False), *conv_args, groups)
    want = torch.ops.aten.convolution_backward(grad, x, weight, None, *conv_args, False, [0] * dims, groups,
                                               [True, False, False])[0]
    assert gx.shape == x.shape and torch.equal(gx, want)


def test_gradients_in_batch_chunks_are_the_whole_batchs(monkeypatch):
    """On CPU the backward's convolutions run on chunks of the batch (bounding oneDNN's copies); with chunks
    of two samples the gradients must equal the one-call ones to fp32 rounding (oneDNN may pick another
    algorithm for another batch size; the weight and bias gradients are sums over the chunks)."""
    from actmem.strategies import ops

    torch.manual_seed(0)
    x, weight = torch.randn(7, 4, 9, 9), torch.randn(6, 4, 3, 3)
    grad = torch.randn(7, 6, 5, 5)
    args = ([2, 2], [1, 1], [1, 1])
    monkeypatch.setattr(ops, "CPU_CHUNK", 2 * x[0].numel() * x.element_size())
    assert len(ops.batch_chunks(x.shape, x.dtype, x.device, 2)) == 4
    gx, gw, gb = ops.conv_backward(grad, lambda: x, x.shape, weight, True, (True, True, True), *args, 1)
    want_x, want_w, want_b = torch.ops.aten.convolution_backward(grad, x, weight, [6], *args, False, [0, 0], 1,
                                                                 [True, True, True])
    torch.testing.assert_close(gx, want_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, want_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, want_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_backward_in_place_is_the_native_ops(affine):
    """batch_norm_backward_ turns the decoded input into the input gradient in place, its sums on chunks
    of the batch (two samples each here); it must give the native op's gradients to fp32 rounding."""
    from actmem.strategies import ops

    torch.manual_seed(0)
    x, grad = torch.randn(7, 5, 6, 4) * 3 + 1, torch.randn(7, 5, 6, 4)
    weight = torch.randn(5) if affine else None
    bias = torch.randn(5) if affine else None
    _, mean, invstd, reserve, impl = torch.ops.aten._batch_norm_impl_index(x, weight, bias, None, None, True, 0.1,
                                                                          1e-5, False)
    need = [True, affine, affine]
    want = torch.ops.aten._batch_norm_impl_index_backward(impl, x, grad, weight, None, None, mean, invstd, True,
                                                          1e-5, need, reserve)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "CPU_CHUNK", 2 * x[0].numel() * x.element_size())
        got = ops.batch_norm_backward_(x.clone(), grad, weight, mean, invstd, need)
    for g, w in zip(got, want):
        if w is None or not w.numel():
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
