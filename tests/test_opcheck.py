"""``torch.library.opcheck`` on every registered ``vhist::*`` op (PyTorch's custom-op
guide): schema (mutation and aliasing as declared), fake implementation against the
real kernel, autograd registration, and AOT dispatch with dynamic shapes.

The ops are enumerated from the dispatcher, so an op registered without a sample here
fails :func:`test_every_op_has_a_sample`. Tiny shapes: the Triton ops run on CPU through
Triton's interpreter.

What the interpreter (or a machine without a GPU) cannot run, and what runs instead:

* The ``*_cuda_*`` ops need the compiled CUDA extension and CUDA tensors. Without a GPU
  they are checked on the meta device, where a custom op runs its fake implementation:
  ``test_schema`` and ``test_autograd_registration`` then check the schema and the
  registration, ``test_faketensor`` checks that the fake accepts the schema's arguments
  and returns the declared outputs (it cannot compare against the real kernel), and
  ``test_aot_dispatch_dynamic`` is skipped: it needs real outputs to compare with.
  With a GPU they run on CUDA tensors like the other ops.
* No op registers an autograd formula: autograd lives in the ``autograd.Function`` above
  each pair of ops (``BatchNormFunction``, ``FusedConvBNFunction``, ...), whose
  gradients tests/test_gradcheck.py checks. The samples therefore carry no
  ``requires_grad`` inputs, and ``test_autograd_registration`` checks that the op does
  not claim to be differentiable through a backend kernel.
"""
from __future__ import annotations

import pytest
import torch

import vhist  # noqa: F401  (registers the ops)
from vhist.ops.depthwise import depthwise_geometry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# Without a GPU the CUDA ops run on the meta device, where there is no real output to
# compare an AOT-compiled graph with.
META_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def registered_ops() -> list[str]:
    """Every op of the ``vhist`` namespace the dispatcher knows, e.g. ``conv2d_fwd``."""
    return sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("vhist::"))


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _conv_samples(device, activation=1, slope=0.01):
    # (N, C_in, H, W) = (2, 4, 5, 5), C_out 6, 3x3, stride 1, padding 1, groups 2.
    x = _cl(torch.randn(2, 4, 5, 5, device=device))
    w = _cl(torch.randn(6, 2, 3, 3, device=device))
    b = torch.randn(6, device=device)
    geom = ([1, 1], [1, 1, 1, 1], [1, 1], 2)
    y, pre = torch.ops.vhist.conv2d_fwd(x, w, b, None, *geom, activation, slope)
    dy = _cl(torch.randn_like(y))
    return {
        # bias, residual, the activation (relu by default)
        "conv2d_fwd": (x, w, b, _cl(torch.randn_like(y)), *geom, activation, slope),
        # all four gradients through the activation's derivative (from the output or the pre-activation)
        "conv2d_bwd": (dy, x, w, y if pre.numel() == 0 else pre, *geom, activation, slope, [True, True, True, True]),
    }


def _fused_conv_samples(device):
    x = _cl(torch.randn(2, 4, 5, 5, device=device))
    w = _cl(torch.randn(6, 4, 3, 3, device=device))
    gamma, beta = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    geom = ([2, 2], [1, 1, 1, 1], [1, 1], 1)  # stride 2: 3x3 output
    stats = (torch.zeros(6, device=device), torch.ones(6, device=device))
    out, conv_out, mean, rstd = torch.ops.vhist.fused_conv_bn_relu_fwd(
        x, w, gamma, beta, *[t.clone() for t in stats], None, *geom, 0.1, 1e-5, 2, 0.01)
    residual = _cl(torch.randn_like(out))
    return {
        "fused_conv_bn_relu_fwd": (x, w, gamma, beta, *stats, residual, *geom, 0.1, 1e-5, 2, 0.01),
        "fused_conv_bn_relu_bwd": (_cl(torch.randn_like(out)), x, w, conv_out, mean, rstd, gamma, beta, residual,
                                   *geom, 1e-5, 2, 0.01, [True, True, True, True, True]),
        # eval: the running statistics, every gradient (the residual's included)
        "fused_conv_bn_relu_eval_bwd": (_cl(torch.randn_like(out)), x, w, gamma, beta, *stats, residual, *geom,
                                        1e-5, 2, 0.01, [True, True, True, True, True]),
    }


def _bn_prologue_samples(device, activation=1, slope=0.01):
    # A producer (4 -> 6 channels, 3x3) whose BN + activation (ReLU by default) the
    # consumer (6 -> 5, 3x3 stride 2, with a conv bias) applies in its prologue.
    x = _cl(torch.randn(2, 4, 5, 5, device=device))
    w1, w2 = _cl(torch.randn(6, 4, 3, 3, device=device)), _cl(torch.randn(5, 6, 3, 3, device=device))
    bias = torch.randn(5, device=device)
    g1, b1 = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    z1, m1, r1 = torch.ops.vhist.conv_bn_stats_fwd(x, w1, None, None, None, None, None, 0, 0.01, None, None,
                                                    [1, 1], [1, 1, 1, 1], [1, 1], 1, 0.1, 1e-5)
    pre = (m1, r1, g1, b1, activation, slope)
    geom = ([2, 2], [1, 1, 1, 1], [1, 1], 1)
    z2, m2, r2 = torch.ops.vhist.conv_bn_stats_fwd(z1, w2, bias, *pre, None, None, *geom, 0.1, 1e-5)
    g2, b2 = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
    stats = (torch.zeros(5, device=device), torch.ones(5, device=device))
    return {
        "conv_bn_stats_fwd": (z1, w2, bias, *pre, *stats, *geom, 0.1, 1e-5),
        "conv_bn_stats_bwd": (_cl(torch.randn_like(z2)), z1, w2, *pre, *geom, 1e-5, [True] * 5),
        "bn_act_fwd": (z2, m2, r2, g2, b2, _cl(torch.randn_like(z2)), 1e-5, activation, slope),
        "bn_act_bwd": (_cl(torch.randn_like(z2)), z2, m2, r2, g2, b2, _cl(torch.randn_like(z2)), 1e-5, activation,
                       slope, [True] * 4),
    }


def _layer_order_samples(device):
    # conv -> GELU -> BN (4 -> 6 channels, 3x3, a conv bias); BN statistics of a tensor
    # no conv produced (the first half of batch_norm_deferred).
    x = _cl(torch.randn(2, 4, 5, 5, device=device))
    w, bias = _cl(torch.randn(6, 4, 3, 3, device=device)), torch.randn(6, device=device)
    gamma, beta = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    geom = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    stats = (torch.zeros(6, device=device), torch.ones(6, device=device))
    out, z, mean, rstd = torch.ops.vhist.fused_conv_act_bn_fwd(x, w, bias, gamma, beta, *[t.clone() for t in stats],
                                                               *geom, 0.1, 1e-5, 6, 0.01)
    return {
        "fused_conv_act_bn_fwd": (x, w, bias, gamma, beta, *stats, *geom, 0.1, 1e-5, 6, 0.01),
        "fused_conv_act_bn_bwd": (_cl(torch.randn_like(out)), x, w, z, mean, rstd, gamma, beta, *geom, 1e-5, 6,
                                  0.01, [True] * 5),
        "batch_norm_stats": (x, torch.zeros(4, device=device), torch.ones(4, device=device), 0.1, 1e-5),
    }


def _depthwise_args(device):
    # (N, C, H, W) = (2, 3, 5, 5), multiplier 2, 3x3, stride 1, 'same' padding.
    x = _cl(torch.randn(2, 3, 5, 5, device=device))
    w = torch.randn(6, 1, 3, 3, device=device)
    geom = depthwise_geometry(x.shape, w.shape, 1, "same", 1)
    return x, w, (list(geom.stride), list(geom.padding), list(geom.dilation)), geom.out_shape


def _depthwise_samples(device, prefix, activation=2, slope=0.01):
    x, w, geom, out_shape = _depthwise_args(device)
    b = torch.randn(6, device=device)
    dy = _cl(torch.randn(out_shape, device=device))
    if prefix == "depthwise_conv2d_cuda":
        # The CUDA kernels have no activation epilogue (activation 0, no residual).
        return {
            f"{prefix}_fwd": (x, w, b, None, *geom, 0, slope),
            f"{prefix}_bwd_input": (dy, None, w, list(x.shape), True, *geom, 0, slope),
            f"{prefix}_bwd_weight": (dy, None, x, list(w.shape), *geom, 0, slope, True),
        }
    y, pre = torch.ops.vhist.depthwise_conv2d_fwd(x, w, b, None, *geom, activation, slope)
    saved = y if pre.numel() == 0 else pre  # what the backward reads for the activation
    return {
        f"{prefix}_fwd": (x, w, b, _cl(torch.randn(out_shape, device=device)), *geom, activation, slope),
        f"{prefix}_bwd_input": (dy, saved, w, list(x.shape), True, *geom, activation, slope),
        f"{prefix}_bwd_weight": (dy, saved, x, list(w.shape), *geom, activation, slope, True),
        f"{prefix}_bwd": (dy, saved, x, w, *geom, activation, slope, True),
    }


def _fused_depthwise_samples(device):
    x, w, geom, out_shape = _depthwise_args(device)
    gamma, beta = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    stats = (torch.zeros(6, device=device), torch.ones(6, device=device))
    out, conv_out, mean, rstd = torch.ops.vhist.fused_depthwise_bn_act_fwd(
        x, w, gamma, beta, *[t.clone() for t in stats], None, *geom, 3, 0.1, 1e-5, 1, 0.01)
    return {
        "fused_depthwise_bn_act_fwd": (x, w, None, beta, *stats, None, *geom, 3, 0.1, 1e-5, 1, 0.01),
        "fused_depthwise_bn_act_bwd": (_cl(torch.randn_like(out)), x, w, conv_out, mean, rstd, gamma, None,
                                       None, *geom, 3, 1e-5, 1, 0.01, [True, True, True, False, False]),
        # eval, no BN bias, the weight gradient alone (the reduce kernel, not the one-pass)
        "fused_depthwise_bn_act_eval_bwd": (_cl(torch.randn_like(out)), x, w, gamma, None, *stats, None, *geom, 3,
                                            1e-5, 1, 0.01, [False, True, True, False, False]),
    }


def _batch_norm_samples(device):
    x = torch.randn(3, 4, 2, 3, device=device)
    w, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    stats = (torch.zeros(4, device=device), torch.ones(4, device=device))
    _, mean, rstd = torch.ops.vhist.batch_norm_fwd(x, w, b, *[t.clone() for t in stats], True, 0.1, 1e-5)
    return {
        "batch_norm_fwd": (x, w, b, *stats, True, 0.1, 1e-5),
        "batch_norm_bwd": (torch.randn_like(x), x, w, b, mean, rstd, True, 1e-5, [True, True, True]),
    }


def _lrn_samples(device, prefix):
    x = torch.randn(2, 6, 3, 3, device=device)
    return {
        f"{prefix}_fwd": (x, 5, 1e-4, 0.75, 2.0),
        f"{prefix}_bwd": (torch.randn_like(x), x, 5, 1e-4, 0.75, 2.0),
    }


def _layer_norm_samples(device):
    # (M, N) = (5, 6) rows; the residual form and the weight-only backward.
    x, r = torch.randn(5, 6, device=device), torch.randn(5, 6, device=device)
    w, b = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    _, mean, rstd, total = torch.ops.vhist.layer_norm_fwd(x, w, b, r, 1e-5)
    return {
        "layer_norm_fwd": (x, w, b, r, 1e-5),
        "layer_norm_bwd": (torch.randn_like(x), total, w, mean, rstd, torch.randn_like(x), [True, False]),
    }


def _bias_gelu_samples(device):
    x, b = torch.randn(5, 6, device=device), torch.randn(6, device=device)
    return {
        "bias_gelu_fwd": (x, b, "tanh"),
        "bias_gelu_bwd": (torch.randn_like(x), x, b, "none", True),
    }


def _attention_samples(device):
    # (B, H) = (1, 2), LQ 5, LK 3, head dim 8; q from a fused projection (non-contiguous).
    qkv = torch.randn(1, 5, 3, 2, 8, device=device).permute(2, 0, 3, 1, 4)
    k, v = torch.randn(1, 2, 3, 8, device=device), torch.randn(1, 2, 3, 8, device=device)
    out, lse = torch.ops.vhist.attention_fwd(qkv[0], k, v, 0.35)
    return {
        "attention_fwd": (qkv[0], k, v, 0.35),
        "attention_bwd": (torch.randn_like(out), qkv[0], k, v, out, lse, 0.35),
    }


def _cuda_device():
    return "cuda" if torch.cuda.is_available() else "meta"


def samples() -> dict[str, tuple[str, tuple]]:
    """op name -> (device, args) for every op this file knows."""
    real = {**_conv_samples(DEVICE), **_fused_conv_samples(DEVICE), **_depthwise_samples(DEVICE, "depthwise_conv2d"),
            **_fused_depthwise_samples(DEVICE), **_batch_norm_samples(DEVICE), **_bn_prologue_samples(DEVICE),
            **_layer_order_samples(DEVICE),
            **_lrn_samples(DEVICE, "local_response_norm"),
            **_layer_norm_samples(DEVICE), **_bias_gelu_samples(DEVICE),
            **_attention_samples(DEVICE)}
    cuda = _cuda_device()
    cuda_ops = {**_depthwise_samples(cuda, "depthwise_conv2d_cuda"), **_lrn_samples(cuda, "local_response_norm_cuda")}
    return {**{name: (DEVICE, args) for name, args in real.items()},
            **{name: (cuda, args) for name, args in cuda_ops.items()}}


KNOWN_OPS = {
    "batch_norm_fwd", "batch_norm_bwd", "conv2d_fwd", "conv2d_bwd", "fused_conv_bn_relu_fwd",
    "fused_conv_bn_relu_bwd", "depthwise_conv2d_fwd", "depthwise_conv2d_bwd_input", "depthwise_conv2d_bwd_weight",
    "depthwise_conv2d_bwd", "depthwise_conv2d_cuda_fwd", "depthwise_conv2d_cuda_bwd_input",
    "depthwise_conv2d_cuda_bwd_weight",
    "fused_depthwise_bn_act_fwd", "fused_depthwise_bn_act_bwd", "local_response_norm_fwd",
    "local_response_norm_bwd", "local_response_norm_cuda_fwd", "local_response_norm_cuda_bwd",
    "conv_bn_stats_fwd", "conv_bn_stats_bwd", "bn_act_fwd", "bn_act_bwd",
    "fused_conv_act_bn_fwd", "fused_conv_act_bn_bwd", "batch_norm_stats",
    "layer_norm_fwd", "layer_norm_bwd", "bias_gelu_fwd", "bias_gelu_bwd",
    "attention_fwd", "attention_bwd",
}


def test_every_op_has_a_sample():
    ops = registered_ops()
    assert ops, "no vhist op is registered"
    assert KNOWN_OPS <= set(ops), f"ops missing from the registry: {sorted(KNOWN_OPS - set(ops))}"
    assert set(ops) == set(samples()), (
        f"ops without an opcheck sample: {sorted(set(ops) - set(samples()))}; "
        f"samples of unknown ops: {sorted(set(samples()) - set(ops))}")


@pytest.fixture(scope="module")
def op_samples():
    torch.manual_seed(0)
    return samples()


@pytest.mark.parametrize("name", registered_ops())
def test_opcheck(name, op_samples):
    if name not in op_samples:
        pytest.fail(f"vhist::{name} has no opcheck sample in tests/test_opcheck.py")
    device, args = op_samples[name]
    utils = META_UTILS if device == "meta" else UTILS
    op = getattr(torch.ops.vhist, name).default
    result = torch.library.opcheck(op, args, test_utils=utils)
    assert set(result) == set(utils), result
    failed = {util: outcome for util, outcome in result.items() if outcome != "SUCCESS"}
    assert not failed, f"vhist::{name}: {failed}"


# Every activation of the kernels (vhist.ops.ACTIVATION_CODES) through the ops whose
# schemas take the pre-activation where the activation's derivative needs it (the conv
# GEMMs' epilogue and dgrad / wgrad) and the BN apply and backward kernels (bn_act, which
# the fused ops and conv_bn_stats' prologue share). Leaky relu with a slope other than the
# default. (The depthwise ops' pre-activation schema: the relu6 sample above and
# tests/test_activations.py.)
ACTIVATION_SAMPLES = (_conv_samples, _bn_prologue_samples)
ACTIVATION_OPS = {"conv2d_fwd", "conv2d_bwd", "bn_act_fwd", "bn_act_bwd"}


@pytest.mark.parametrize("activation", sorted(set(vhist.ops.ACTIVATION_CODES.values()) - {0, 1, 2}))
def test_opcheck_activations(activation):
    torch.manual_seed(0)
    for make in ACTIVATION_SAMPLES:
        for name, args in make(DEVICE, activation=activation, slope=0.2).items():
            if name not in ACTIVATION_OPS:
                continue
            op = getattr(torch.ops.vhist, name).default
            result = torch.library.opcheck(op, args, test_utils=UTILS)
            failed = {util: outcome for util, outcome in result.items() if outcome != "SUCCESS"}
            assert set(result) == set(UTILS) and not failed, f"vhist::{name}, activation {activation}: {failed}"
