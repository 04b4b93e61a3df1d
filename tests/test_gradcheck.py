"""fp64 gradcheck of every vhist op on its Triton kernels (through the interpreter on
CPU, compiled on CUDA)."""
import pytest
import torch
from torch.autograd import gradcheck

import vhist

from conftest import DEVICE

F64 = dict(device=DEVICE, dtype=torch.float64)

BATCH_NORM_CASES = [
    # (shape, memory format, training, affine)
    ((3, 2, 3, 4), "contiguous", True, True),
    ((3, 2, 3, 4), "channels_last", True, True),
    ((3, 2, 3, 4), "contiguous", True, False),
    ((3, 2, 3, 4), "channels_last", False, True),
    ((3, 2, 3, 4), "contiguous", False, False),
    ((5, 3), "contiguous", True, True),       # (N, C)
    ((2, 3, 5), "contiguous", False, True),   # (N, C, L)
]


@pytest.mark.parametrize("case", BATCH_NORM_CASES, ids=str)
def test_batch_norm_gradcheck(case, triton_backend):
    shape, fmt, training, affine = case
    c = shape[1]
    x = torch.randn(shape, **F64)
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(c, **F64, requires_grad=True) if affine else None
    bias = torch.randn(c, **F64, requires_grad=True) if affine else None
    running_mean, running_var = torch.randn(c, **F64), torch.rand(c, **F64) + 0.5

    def fn(x, weight, bias):
        # Fresh running stats per call: gradcheck evaluates fn many times.
        return vhist.ops.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias,
                                    training, 0.1, 1e-5)

    assert gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-5, rtol=1e-4)


DEPTHWISE_CASES = [
    # (N, C_in, H, W, multiplier, kernel, stride, padding, dilation, memory format)
    (1, 2, 4, 4, 1, 3, 1, 1, 1, "channels_last"),   # minimal: checked with the full Jacobian
    (2, 2, 5, 5, 1, 3, 1, 1, 1, "channels_last"),
    (1, 3, 5, 5, 2, 3, 2, 1, 1, "contiguous"),      # multiplier 2, stride 2
    (1, 2, 5, 5, 1, 5, 1, "same", 1, "channels_last"),
    (2, 2, 5, 5, 1, 3, 1, 2, 2, "channels_last"),   # dilation 2
]


@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=str)
def test_depthwise_conv2d_gradcheck(case, triton_backend):
    n, c, h, w, mult, k, stride, padding, dilation, fmt = case
    x = torch.randn(n, c, h, w, **F64)
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(c * mult, 1, k, k, **F64, requires_grad=True)
    bias = torch.randn(c * mult, **F64, requires_grad=True)

    def fn(x, weight, bias):
        return vhist.ops.depthwise_conv2d(x, weight, bias, stride, padding, dilation)

    # Beyond the minimal case, fast_mode checks random projections of the Jacobian: each
    # interpreted forward costs ~0.3 s, the full numerical Jacobian takes ~1 min per case.
    fast = case != DEPTHWISE_CASES[0]
    assert gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast)


CONV_CASES = [
    # (input shape, weight shape, stride, padding, dilation, groups, activation, residual)
    ((1, 2, 4, 4), (3, 2, 3, 3), 1, 1, 1, 1, "relu", True),       # bias + residual + relu epilogue
    ((2, 4, 4, 4), (2, 2, 3, 3), 2, "valid", 1, 2, "relu6", False),  # groups=2, stride 2
    ((1, 3, 5, 4), (2, 3, 2, 2), 1, "same", 1, 1, None, False),    # asymmetric 'same'
]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_gradcheck(case, triton_backend):
    shape, wshape, stride, padding, dilation, groups, activation, residual = case
    x = torch.randn(shape, **F64, requires_grad=True)
    weight = torch.randn(wshape, **F64, requires_grad=True)
    bias = torch.randn(wshape[0], **F64, requires_grad=True)
    inputs = [x, weight, bias]
    if residual:
        out_shape = vhist.ops.conv2d(x, weight, None, stride, padding, dilation, groups).shape
        inputs.append(torch.randn(out_shape, **F64, requires_grad=True))

    def fn(x, weight, bias, residual=None):
        return vhist.ops.conv2d(x, weight, bias, stride, padding, dilation, groups,
                                activation=activation, residual=residual)

    # fast_mode (random projections of the Jacobian): the full numerical Jacobian costs
    # ~1 min per case through the interpreter; test_conv.py compares every gradient.
    assert gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


FUSED_CONV_CASES = [
    # (input shape, weight shape, stride, padding, groups, training, activation, residual)
    ((2, 2, 4, 4), (3, 2, 3, 3), 1, 1, 1, True, "relu", True),     # ResNet block, training
    ((2, 2, 4, 4), (3, 2, 3, 3), 1, 1, 1, False, "relu", True),    # eval: BN folded into the conv
    ((2, 4, 4, 4), (2, 2, 3, 3), 2, 1, 2, True, "relu6", False),   # groups=2, stride 2
    ((1, 3, 4, 4), (2, 3, 1, 1), 1, 0, 1, True, None, False),      # 1x1 linear bottleneck
]


@pytest.mark.parametrize("case", FUSED_CONV_CASES, ids=str)
def test_fused_conv_bn_relu_gradcheck(case, triton_backend):
    shape, wshape, stride, padding, groups, training, activation, residual = case
    c = wshape[0]
    x = torch.randn(shape, **F64).to(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(wshape, **F64, requires_grad=True)
    gamma = (torch.rand(c, **F64) + 0.5).requires_grad_()
    beta = torch.randn(c, **F64, requires_grad=True)
    running_mean, running_var = torch.randn(c, **F64), torch.rand(c, **F64) + 0.5
    inputs = [x, weight, gamma, beta]
    if residual:
        with torch.no_grad():
            out_shape = vhist.ops.conv2d(x, weight, None, stride, padding, 1, groups).shape
        inputs.append(torch.randn(out_shape, **F64, requires_grad=True))

    def fn(x, weight, gamma, beta, residual=None):
        return vhist.ops.fused_conv_bn_relu(
            x, weight, gamma, beta, running_mean.clone(), running_var.clone(), stride=stride,
            padding=padding, groups=groups, training=training, activation=activation, residual=residual)

    assert gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


FUSED_DEPTHWISE_CASES = [
    # (N, C_in, H, W, multiplier, stride, activation, residual, training)
    (2, 2, 5, 5, 1, 1, "relu6", False, True),
    (2, 2, 5, 5, 2, 2, None, True, True),
    (1, 3, 5, 5, 1, 1, "relu", True, False),  # eval: BN folded into the depthwise weights
]


@pytest.mark.parametrize("case", FUSED_DEPTHWISE_CASES, ids=str)
def test_fused_depthwise_bn_act_gradcheck(case, triton_backend):
    n, c, h, w, mult, stride, activation, has_residual, training = case
    cout = c * mult
    x = torch.randn(n, c, h, w, **F64).to(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(cout, 1, 3, 3, **F64, requires_grad=True)
    gamma = (torch.rand(cout, **F64) + 0.5).requires_grad_()
    beta = torch.randn(cout, **F64, requires_grad=True)
    oh = (h + 2 - 3) // stride + 1
    residual = torch.randn(n, cout, oh, oh, **F64, requires_grad=True) if has_residual else None
    running_mean, running_var = torch.randn(cout, **F64), torch.rand(cout, **F64) + 0.5

    def fn(x, weight, gamma, beta, residual):
        # Scaled so that some outputs fall in each region of ReLU6 (below 0, 0..6, above 6),
        # away from the kinks the finite differences would straddle.
        return vhist.ops.fused_depthwise_bn_act(
            x, weight, gamma * 3, beta, running_mean.clone(), running_var.clone(), stride=stride, padding=1,
            training=training, activation=activation, residual=residual)

    assert gradcheck(fn, (x, weight, gamma, beta, residual), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


LRN_CASES = [
    # (shape, memory format, size)
    ((2, 4, 2, 3), "contiguous", 5),     # odd window, clipped at both channel edges
    ((2, 5, 2, 2), "channels_last", 4),  # even window: asymmetric, transposed in the backward
    ((2, 3, 4), "contiguous", 2),        # 3-D
    ((1, 2, 2, 2, 2), "channels_last", 3),  # 5-D, C = 2 < size
    ((1, 18, 1, 2), "contiguous", 5),    # C > 16: the periodic exact re-sum mid-row
]


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", LRN_CASES, ids=str)
def test_local_response_norm_gradcheck(case, backend):
    shape, fmt, size = case
    x = torch.randn(shape, **F64)
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    x.requires_grad_()

    def fn(x):
        # alpha large enough that the window term matters against k.
        with vhist.use_backend(backend):
            return vhist.ops.local_response_norm(x, size, 2.0, 0.75, 1.0)

    assert gradcheck(fn, (x,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


SYNC_BATCH_NORM_CASES = [
    # (shape, memory format); one process: the synchronized op over its own batch
    ((2, 2, 2, 3), "contiguous"),
    ((2, 3, 2, 2), "channels_last"),
]


@pytest.mark.parametrize("case", SYNC_BATCH_NORM_CASES, ids=str)
def test_sync_batch_norm_gradcheck(case, triton_backend):
    shape, fmt = case
    c = shape[1]
    x = torch.randn(shape, **F64)
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(c, **F64, requires_grad=True)
    bias = torch.randn(c, **F64, requires_grad=True)
    running_mean, running_var = torch.zeros(c, **F64), torch.ones(c, **F64)

    def fn(x, weight, bias):
        return vhist.ops.sync_batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, True, 0.1, 1e-5)

    assert gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
