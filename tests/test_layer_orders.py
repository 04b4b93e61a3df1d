"""The layer orders besides conv -> BN -> activation (issue 23, item 2):

* conv -> activation -> BN (ConvMixer): ``vhist.ops.fused_conv_act_bn``, the statistics of
  the activated output in the conv's epilogue;
* BN -> activation -> conv on a tensor no single conv produced (DenseNet's concatenation):
  ``vhist.ops.batch_norm_deferred``, the statistics from the BatchNorm kernels, normalize +
  activation in the consuming conv's prologue.

Each on the triton backend (Triton's interpreter on CPU) against the torch backend
(PyTorch's own ops), fp64: output, every gradient, running statistics over training
steps, eval; fp64 gradchecks; bad input.
"""
import pytest
import torch
from torch.autograd import gradcheck

import vhist
from vhist.ops import DeferredBNAct

from conftest import DEVICE

F64 = dict(device=DEVICE, dtype=torch.float64)
SLOPE = 0.2


def _randn(seed, *shapes, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(DEVICE) for s in shapes]


def _bn(c, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE),
            (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).to(DEVICE)]


def _stats(c):
    return [torch.zeros(c, **F64), torch.ones(c, **F64)]


def _steps(fn, leaves, stats, backend, modes):
    """``fn`` run once per mode in ``modes`` (True: training) on fresh leaves; returns the
    outputs, every gradient and the running statistics after the last step."""
    results = []
    with vhist.use_backend(backend):
        for step, training in enumerate(modes):
            params = [t.clone().requires_grad_() for t in leaves]
            out = fn(*params, *stats, training)
            (grad,) = _randn(100 + step, out.shape)
            results += [out.detach(), *torch.autograd.grad(out, params, grad)]
    return results + stats


def _compare(fn, leaves, channels, modes):
    ours = _steps(fn, leaves, [s for c in channels for s in _stats(c)], "triton", modes)
    ref = _steps(fn, leaves, [s for c in channels for s in _stats(c)], "torch", modes)
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m: f"tensor {i}: {m}")


# ----------------------------------------------------------------------------- conv -> act -> BN

CONV_ACT_BN_CASES = [
    # (N, C_in, H, W, C_out, kernel, stride, padding, groups, conv bias, memory format)
    (2, 3, 4, 4, 4, 3, 1, 1, 1, True, "channels_last"),   # minimal, with a conv bias
    (1, 6, 4, 4, 6, 3, 2, 1, 3, False, "contiguous"),     # grouped, strided, N=1, NCHW input
    (2, 3, 6, 6, 5, 1, 1, 0, 1, True, "channels_last"),   # a stem-width (3 channel) 1x1 conv
]


def _conv_act_bn(act, case):
    n, c_in, h, w, c_out, k, stride, padding, groups, has_bias, fmt = case

    def fn(x, weight, *rest):
        *params, rm, rv, training = rest
        bias, gamma, beta = params if has_bias else (None, *params)
        if fmt == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        return vhist.ops.fused_conv_act_bn(x, weight, gamma, beta, rm, rv, bias=bias, stride=stride,
                                           padding=padding, groups=groups, activation=act, negative_slope=SLOPE,
                                           training=training, momentum=0.3)

    leaves = _randn(0, (n, c_in, h, w), (c_out, c_in // groups, k, k), scale=0.7)
    leaves += (_randn(1, (c_out,)) if has_bias else []) + _bn(c_out)
    return fn, leaves, [c_out]


@pytest.mark.parametrize("case,activations,modes", [
    # a kink (relu), a smooth one (gelu), one with a slope on the minimal case (a training
    # step, then eval; tests/test_activations.py runs every activation through the same
    # kernels' helpers); one on the others (two training steps, then eval: the running
    # statistics' update twice)
    (CONV_ACT_BN_CASES[0], [None, "relu", "gelu", "hardswish", "leaky_relu"], (True, False)),
    (CONV_ACT_BN_CASES[1], ["gelu"], (True, True, False)),
    (CONV_ACT_BN_CASES[2], ["leaky_relu"], (True, True, False)),
], ids=["all-activations", "grouped-strided", "1x1"])
def test_fused_conv_act_bn_fwd_bwd(case, activations, modes):
    """Output, all gradients and the running statistics (momentum 0.3)."""
    for act in activations:
        fn, leaves, channels = _conv_act_bn(act, case)
        _compare(fn, leaves, channels, modes)


@pytest.mark.parametrize("act", ["gelu", "leaky_relu", "hardswish"])
def test_fused_conv_act_bn_gradcheck(act, triton_backend):
    fn, leaves, _ = _conv_act_bn(act, CONV_ACT_BN_CASES[0][:1] + (3, 3, 3, 4, 3, 1, 1, 1, True, "channels_last"))
    leaves = [t.requires_grad_() for t in leaves]
    assert gradcheck(lambda *p: fn(*p, None, None, True), leaves, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_fused_conv_act_bn_bad_input():
    x, w = _randn(0, (2, 4, 5, 5), (6, 4, 3, 3))
    with pytest.raises(ValueError, match="unknown activation"):
        vhist.ops.fused_conv_act_bn(x, w, None, None, None, None, activation="elu")
    with pytest.raises(ValueError, match="running_mean"):
        vhist.ops.fused_conv_act_bn(x, w, None, None, None, None, training=False)
    with pytest.raises(ValueError, match="bias"):
        vhist.ops.fused_conv_act_bn(x, w, None, None, None, None, bias=torch.zeros(5, **F64))


# ----------------------------------------------------------------------------- BN -> act -> conv


def _dense_layer(act, consumer, fmt):
    """A DenseNet layer: BN -> act -> 1x1 conv on the concatenation of two feature maps,
    then BN -> act -> 3x3 conv (``consumer``: the prologue op that takes the deferred
    input)."""

    def fn(a, b, gamma1, beta1, w1, gamma2, beta2, w2, rm1, rv1, rm2, rv2, training):
        x = torch.cat([a, b], 1)
        if fmt == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        y = vhist.ops.batch_norm_deferred(x, gamma1, beta1, rm1, rv1, training=training, momentum=0.3,
                                          activation=act, negative_slope=SLOPE)
        if consumer == "conv_bn_deferred":
            y = vhist.ops.conv_bn_deferred(y, w1, gamma2, beta2, rm2, rv2, training=training, momentum=0.3,
                                           activation=act, negative_slope=SLOPE)
            return vhist.ops.conv2d(y, w2, padding=1)
        y = vhist.ops.fused_conv_bn_act(y, w1, gamma2, beta2, rm2, rv2, training=training, momentum=0.3,
                                        activation=act, negative_slope=SLOPE)
        return vhist.ops.conv2d(y, w2, padding=1)

    leaves = _randn(0, (2, 3, 4, 4), (2, 2, 4, 4)) + _bn(5) + _randn(1, (6, 5, 1, 1), scale=0.5)
    return fn, leaves + _bn(6, seed=8) + _randn(2, (4, 6, 3, 3), scale=0.4), [5, 6]


@pytest.mark.parametrize("consumer,fmt,activations,modes", [
    ("fused_conv_bn_act", "channels_last", [None, "hardsigmoid", "leaky_relu"], (True, False)),
    ("conv_bn_deferred", "contiguous", ["relu", "silu"], (True, True, False)),
], ids=["fused_conv_bn_act-consumer", "conv_bn_deferred-consumer-nchw"])
def test_batch_norm_deferred_fwd_bwd(consumer, fmt, activations, modes):
    """Output, all gradients (the BN's through its consumer's prologue backward) and both
    layers' running statistics."""
    for act in activations:
        fn, leaves, channels = _dense_layer(act, consumer, fmt)
        _compare(fn, leaves, channels, modes)


def test_batch_norm_deferred_returns_deferred_in_training(triton_backend):
    (x,) = _randn(0, (2, 4, 3, 3))
    rm, rv = _stats(4)
    y = vhist.ops.batch_norm_deferred(x, None, None, rm, rv, activation="silu")
    assert isinstance(y, DeferredBNAct) and y.conv_output.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(rm, 0.1 * x.mean((0, 2, 3)))
    ref = torch.nn.functional.silu(torch.nn.functional.batch_norm(x, None, None, training=True))
    torch.testing.assert_close(vhist.ops.as_tensor(y), ref)
    out = vhist.ops.batch_norm_deferred(x, None, None, rm, rv, training=False, activation="silu")
    assert isinstance(out, torch.Tensor)


@pytest.mark.parametrize("act", ["relu", "gelu_tanh"])
def test_batch_norm_deferred_gradcheck(act, triton_backend):
    a, b = (t.requires_grad_() for t in _randn(3, (1, 2, 3, 3), (1, 1, 3, 3)))
    gamma, beta = (t.requires_grad_() for t in _bn(3))
    (w,) = (t.requires_grad_() for t in _randn(4, (2, 3, 3, 3), scale=0.5))

    def fn(a, b, gamma, beta, w):
        y = vhist.ops.batch_norm_deferred(torch.cat([a, b], 1), gamma, beta, None, None, activation=act)
        return vhist.ops.fused_conv_bn_act(y, w, None, None, None, None, padding=1, activation=None)

    assert gradcheck(fn, (a, b, gamma, beta, w), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_batch_norm_deferred_bad_input():
    (x,) = _randn(0, (2, 4, 3))
    with pytest.raises(ValueError, match="4-D"):
        vhist.ops.batch_norm_deferred(x, None, None, None, None)
    (x,) = _randn(0, (2, 4, 3, 3))
    with pytest.raises(ValueError, match="unknown activation"):
        vhist.ops.batch_norm_deferred(x, None, None, None, None, activation="elu")
    with pytest.raises(ValueError, match="running_mean"):
        vhist.ops.batch_norm_deferred(x, None, None, None, None, training=False)
