"""Every activation of the kernels (``vhist.ops.ACTIVATION_CODES``) in every place the
kernels apply it: the conv GEMM's epilogue (``conv2d``, saving the output for ReLU /
ReLU6 and the pre-activation for the others), the depthwise epilogue, the BatchNorm
apply pass of the fused conv + BN ops (training) and their folded eval path, and the
next conv's prologue (``conv_bn_deferred``). Each against PyTorch's own op
(``vhist.reference``), forward and every gradient, at one tiny shape per op through
Triton's interpreter; the exact kink points and non-finite values through the conv and
depthwise epilogues; fp64 gradchecks (tests/test_opcheck.py runs opcheck per activation,
tests/test_nonfinite.py the NaN / Inf grid)."""
import pytest
import torch
from torch.autograd import gradcheck

import vhist
from vhist import reference
from vhist.ops import ACTIVATION_CODES
from vhist.ops.depthwise import TRITON_OPS, DepthwiseConv2dFunction

from conftest import DEVICE

ACTIVATIONS = list(ACTIVATION_CODES)
F64 = dict(device=DEVICE, dtype=torch.float64)
SLOPE = 0.2  # leaky relu's slope, not the default, so that a dropped slope fails


def test_reference_lists_every_activation():
    assert set(reference.ACTIVATIONS) == set(ACTIVATION_CODES)


def _leaves(seed, *shapes, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(DEVICE) for s in shapes]


def _conv2d(act, x, w, b, res, stats):
    return vhist.ops.conv2d(x, w, b, padding=1, activation=act, residual=res, negative_slope=SLOPE)


def _fused(training):
    def fn(act, x, w, gamma, beta, res, stats):
        return vhist.ops.fused_conv_bn_act(x, w, gamma, beta, *stats[0], padding=1, training=training,
                                           activation=act, residual=res, negative_slope=SLOPE)
    return fn


def _fused_depthwise(training):
    def fn(act, x, w, gamma, beta, res, stats):
        return vhist.ops.fused_depthwise_bn_act(x, w, gamma, beta, *stats[0], padding=1, training=training,
                                                activation=act, residual=res, negative_slope=SLOPE)
    return fn


def _deferred(act, x, w1, gamma, beta, w2, stats):
    # The first layer's BN + act applied in the second conv's prologue (training).
    y = vhist.ops.conv_bn_deferred(x, w1, gamma, beta, *stats[0], padding=1, activation=act,
                                   negative_slope=SLOPE)
    return vhist.ops.fused_conv_bn_act(y, w2, None, None, *stats[1], padding=1, activation=act,
                                       negative_slope=SLOPE)


def _bn_params(c):
    gen = torch.Generator().manual_seed(7)
    gamma = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    return [gamma.to(DEVICE), (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).to(DEVICE)]


OPS = {
    # name: (function, leaves(x, ...), running-statistic channels); x (2, 4, 4, 4) throughout.
    "conv2d": (_conv2d, lambda: _leaves(0, (2, 4, 4, 4), (5, 4, 3, 3), (5,), (2, 5, 4, 4), scale=0.6), []),
    "fused_conv_bn_act_train": (_fused(True), lambda: _leaves(0, (2, 4, 4, 4), (5, 4, 3, 3))
                                + _bn_params(5) + _leaves(1, (2, 5, 4, 4)), [5]),
    "fused_conv_bn_act_eval": (_fused(False), lambda: _leaves(0, (2, 4, 4, 4), (5, 4, 3, 3), scale=0.6)
                               + _bn_params(5) + _leaves(1, (2, 5, 4, 4)), [5]),
    "fused_depthwise_bn_act_train": (_fused_depthwise(True), lambda: _leaves(0, (2, 4, 4, 4), (4, 1, 3, 3))
                                     + _bn_params(4) + _leaves(1, (2, 4, 4, 4)), [4]),
    "fused_depthwise_bn_act_eval": (_fused_depthwise(False), lambda: _leaves(0, (2, 4, 4, 4), (4, 1, 3, 3))
                                    + _bn_params(4) + _leaves(1, (2, 4, 4, 4)), [4]),
    "conv_bn_deferred": (_deferred, lambda: _leaves(0, (2, 4, 4, 4), (5, 4, 3, 3)) + _bn_params(5)
                         + _leaves(2, (3, 5, 3, 3)), [5, 3]),
}


def _run(name, act, backend):
    fn, make, channels = OPS[name]
    leaves = [t.requires_grad_() for t in make()]
    gen = torch.Generator().manual_seed(3)
    stats = [((torch.randn(c, generator=gen, dtype=torch.float64) * 0.3).to(DEVICE),
              (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE)) for c in channels]
    with vhist.use_backend(backend):
        out = fn(act, *leaves, stats)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad(out, leaves, grad)
    return [out.detach(), *grads, *[s for pair in stats for s in pair]]


@pytest.mark.parametrize("name", OPS)
def test_activation_fwd_bwd(name):
    """Output, every gradient and the running statistics, fp64, for every activation."""
    for act in ACTIVATIONS:
        ours, ref = _run(name, act, "triton"), _run(name, act, "torch")
        for i, (a, b) in enumerate(zip(ours, ref)):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m: f"{name} {act} tensor {i}: {m}")


# Exactly at the kinks (hardswish / hardsigmoid at +-3, relu / relu6 / leaky relu at 0
# and 6), about them, and non-finite: the pre-activation is the input itself (a 1x1 conv
# of weight 1 on one channel, an identity depthwise tap on 1x1 images whose other taps
# meet only padding, no bias), so each value reaches the epilogue exactly and no Inf
# meets a zero weight.
KINKS = [-float("inf"), -6.0, -3.0, -2.999, -1.0, -0.0, 0.0, 0.5, 2.999, 3.0, 3.001, 6.0, 7.0, float("inf"),
         float("nan")]


def _identity_dense(x, act):
    c = x.shape[1]
    w = torch.eye(c, **F64).view(c, c, 1, 1)
    return vhist.ops.conv2d(x, w, activation=act, negative_slope=SLOPE)


def _identity_depthwise(x, act):
    c = x.shape[1]
    w = torch.zeros(c, 1, 3, 3, **F64)
    w[:, :, 1, 1] = 1.0
    return DepthwiseConv2dFunction.apply(x, w, None, None, [1, 1], [1, 1, 1, 1], [1, 1], ACTIVATION_CODES[act],
                                         TRITON_OPS, SLOPE)


def _same(actual, expected, what):
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ: {actual} vs {expected}"
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("conv", [_identity_dense, _identity_depthwise], ids=["conv2d", "depthwise"])
def test_activation_kinks_and_nonfinite(conv, triton_backend):
    values = torch.tensor(KINKS, **F64)
    channels = 1 if conv is _identity_dense else 2
    x0 = values.view(-1, 1, 1, 1).expand(-1, channels, 1, 1).clone()  # one value per image
    for act in ACTIVATIONS:
        x = x0.clone().requires_grad_()
        out = conv(x, act)
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
        x_ref = x0.clone().requires_grad_()
        out_ref = reference.activate(x_ref, act, SLOPE)
        (grad_ref,) = torch.autograd.grad(out_ref, x_ref, torch.ones_like(out_ref))
        _same(out.detach(), out_ref.detach(), f"{act} forward")
        _same(grad, grad_ref, f"{act} backward")


@pytest.mark.parametrize("act", [a for a in ACTIVATIONS if a not in (None, "relu", "relu6")])
def test_activation_gradcheck(act, triton_backend):
    """fp64 gradcheck of the conv epilogue (pre-activation saved), the fused BN apply and
    backward kernels, and the next conv's prologue with its weight gradient's recompute."""
    x, w, b = (t.requires_grad_() for t in _leaves(4, (1, 2, 3, 3), (3, 2, 3, 3), (3,), scale=0.7))
    assert gradcheck(lambda x, w, b: vhist.ops.conv2d(x, w, b, padding=1, activation=act, negative_slope=SLOPE),
                     (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
    w1, w2 = (t.requires_grad_() for t in _leaves(5, (3, 2, 3, 3), (2, 3, 1, 1)))
    gamma, beta = (t.requires_grad_() for t in _bn_params(3))

    def chain(x, w1, gamma, beta, w2):
        y = vhist.ops.conv_bn_deferred(x, w1, gamma, beta, None, None, padding=1, activation=act,
                                       negative_slope=SLOPE)
        return vhist.ops.fused_conv_bn_act(y, w2, None, None, None, None, activation=act, negative_slope=SLOPE)

    assert gradcheck(chain, (x, w1, gamma, beta, w2), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_bad_negative_slope():
    x, w = _leaves(0, (1, 2, 3, 3), (2, 2, 1, 1))
    with pytest.raises(TypeError, match="negative_slope"):
        vhist.ops.conv2d(x, w, activation="leaky_relu", negative_slope="0.1")
