"""NaN and Inf propagate exactly as in PyTorch: every op x activation x {NaN, Inf} x {in
the input, in the output gradient}, on the triton backend against the torch backend
(PyTorch's own ops), position by position: the output, every gradient and the running
statistics. PyTorch's rules the kernels follow: relu(NaN) = hardtanh(NaN) = NaN;
relu's backward passes the gradient where not x <= 0 and hardtanh's where not
(x <= min or x >= max), so a NaN pre-activation passes it; a channel holding an Inf has
an Inf batch mean (and running mean) and a NaN variance.

Training mode makes a whole channel non-finite once one conv output is (its batch
statistics are), so the eval cases (running statistics, BN folded) are the
position-sensitive ones for the forward activation. The parameter gradients with an
Inf are the position-sensitive ones for the backward: the eval fused ops must not
differentiate through the BN fold (Inf - Inf), and the depthwise weight gradient must
sum over exactly the (output, tap) pairs PyTorch's conv backward does (dy * 0 over
the zero padding, never x * 0 for an output that does not exist)."""
import pytest
import torch

import vhist
from vhist.nn import functional as VF
from vhist.ops import conv_bn_deferred

from conftest import DEVICE

ACTIVATIONS = [None, "relu", "relu6"]
# The other activations of the kernels, on a subset of the grid (below).
NEW_ACTIVATIONS = [a for a in vhist.ops.ACTIVATION_CODES if a not in ACTIVATIONS]
VALUES = {"nan": float("nan"), "inf": float("inf")}
WHERE = ["input", "grad"]


def _poison(t: torch.Tensor, value: float) -> torch.Tensor:
    """``t`` with ``value`` at every 7th element (several positions, both signs of the
    pre-activation among them)."""
    t = t.clone()
    t.view(-1)[3::7] = value
    return t


def _tensors(seed, *shapes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def _bn_params(c, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.5


# Each op: fn(x, params, stats, activation, training), x the tensor a non-finite input
# goes into, params its other leaves (_make_params), stats the (running mean, running
# var) pairs it updates.
def _batch_norm(x, params, stats, activation, training):
    (w, b), (rm, rv) = params, stats[0]
    return VF.batch_norm(x, rm, rv, w, b, training=training)


def _sync_batch_norm(x, params, stats, activation, training):
    # One process: its own statistics stages (local partials merged by merge_stats, the
    # finalize fed the gathered rows).
    (w, b), (rm, rv) = params, stats[0]
    return VF.sync_batch_norm(x, rm, rv, w, b, training=training)


def _conv2d(x, params, stats, activation, training):
    w, b = params
    return VF.conv2d(x, w, b, padding=1, activation=activation)


def _depthwise(x, params, stats, activation, training):
    w, b = params
    return VF.depthwise_conv2d(x, w, b, padding=1)


def _depthwise_stride2(x, params, stats, activation, training):
    # Stride 2 on (6, 5): the last output's taps reach the end padding along W, not along H.
    w, b = params
    return VF.depthwise_conv2d(x, w, b, stride=2, padding=1)


def _fused_conv(x, params, stats, activation, training):
    (w, g, b), (rm, rv) = params, stats[0]
    return VF.fused_conv_bn_act(x, w, g, b, rm, rv, padding=1, training=training,
                                                 activation=activation)


def _fused_depthwise(x, params, stats, activation, training):
    (w, g, b), (rm, rv) = params, stats[0]
    return VF.fused_depthwise_bn_act(x, w, g, b, rm, rv, padding=1, training=training,
                                                      activation=activation)


def _deferred(x, params, stats, activation, training):
    # conv_bn_deferred (the BN + act applied in the next conv's prologue), then the
    # terminal fused op.
    (w1, g1, b1, w2, g2, b2), ((rm1, rv1), (rm2, rv2)) = params, stats
    y = conv_bn_deferred(x, w1, g1, b1, rm1, rv1, padding=1, training=training, activation=activation)
    return vhist.ops.fused_conv_bn_act(y, w2, g2, b2, rm2, rv2, padding=0, training=training, activation=activation)


def _lrn(x, params, stats, activation, training):
    return VF.local_response_norm(x, 3, alpha=1e-2, beta=0.75, k=1.0)


def _make_params(op):
    """The op's parameters (leaves, fixed seed) and its running-statistic channel counts."""
    if op in ("batch_norm", "sync_batch_norm"):
        return [*_bn_params(4)], [4]
    if op == "conv2d":
        w, b = _tensors(1, (5, 3, 3, 3), (5,))
        return [w * 0.4, b], []
    if op in ("depthwise_conv2d", "depthwise_conv2d_stride2"):
        w, b = _tensors(1, (4, 1, 3, 3), (4,))
        return [w * 0.4, b], []
    if op == "fused_conv_bn_act":
        (w,) = _tensors(1, (5, 3, 3, 3))
        return [w * 0.4, *_bn_params(5)], [5]
    if op == "fused_depthwise_bn_act":
        (w,) = _tensors(1, (4, 1, 3, 3))
        return [w * 0.4, *_bn_params(4)], [4]
    if op == "conv_bn_deferred":
        w1, w2 = _tensors(1, (5, 3, 3, 3), (6, 5, 1, 1))
        return [w1 * 0.4, *_bn_params(5), w2 * 0.4, *_bn_params(6, seed=6)], [5, 6]
    return [], []


OPS = {
    # op: (input shape (commented: why), function, activations it takes)
    "batch_norm": ((2, 4, 3, 3), _batch_norm, [None]),              # plain BN, NCHW
    "sync_batch_norm": ((2, 4, 3, 3), _sync_batch_norm, [None]),    # its own stages, one process
    "conv2d": ((2, 3, 5, 5), _conv2d, ACTIVATIONS),                 # activation epilogue
    "fused_conv_bn_act": ((2, 3, 5, 5), _fused_conv, ACTIVATIONS),
    "depthwise_conv2d": ((2, 4, 5, 5), _depthwise, [None]),
    "depthwise_conv2d_stride2": ((2, 4, 6, 5), _depthwise_stride2, [None]),
    "fused_depthwise_bn_act": ((2, 4, 5, 5), _fused_depthwise, ACTIVATIONS),
    "conv_bn_deferred": ((2, 3, 5, 5), _deferred, ACTIVATIONS),     # BN + act in the next conv's prologue
    "local_response_norm": ((2, 5, 3, 3), _lrn, [None]),
}


def _run(op, activation, value, where, backend, training):
    shape, fn, _ = OPS[op]
    params, stat_channels = _make_params(op)
    (x,) = _tensors(0, shape)
    if where == "input":
        x = _poison(x, value)
    if op in ("depthwise_conv2d", "depthwise_conv2d_stride2", "fused_depthwise_bn_act"):
        x = x.contiguous(memory_format=torch.channels_last)
    leaves = [x.to(DEVICE).requires_grad_()]
    params = [p.to(DEVICE).requires_grad_() for p in params]
    stats = [(torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)) for c in stat_channels]
    # oneDNN's CPU conv skips the products with the zero padding (so Inf * 0 never
    # forms there); PyTorch's native algorithm, like the kernels and the definition
    # (F.unfold, then a GEMM), forms them: the reference runs without oneDNN.
    with vhist.use_backend(backend), torch.backends.mkldnn.flags(enabled=False):
        out = fn(leaves[0], params, stats, activation, training)
        (grad_out,) = _tensors(2, out.shape)
        if where == "grad":
            grad_out = _poison(grad_out, value)
        grads = torch.autograd.grad(out, leaves + params, grad_out.to(DEVICE))
    return out.detach(), grads, [s for pair in stats for s in pair]


def _assert_same_nonfinite(actual, expected, name):
    """Same NaN positions, same Inf positions and signs, the finite values close."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    nan, nan_ref = actual.isnan(), expected.isnan()
    assert torch.equal(nan, nan_ref), (f"{name}: NaN at {nan.sum()} positions, PyTorch at {nan_ref.sum()}; "
                                       f"first difference at {(nan != nan_ref).nonzero()[0].tolist()}")
    inf, inf_ref = actual.isinf(), expected.isinf()
    assert torch.equal(inf, inf_ref) and torch.equal(actual[inf], expected[inf_ref]), (
        f"{name}: Inf at {inf.sum()} positions, PyTorch at {inf_ref.sum()}")
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=2e-4, equal_nan=True, msg=lambda m: f"{name}: {m}")


# Eval only for the ops with BatchNorm (the others have no mode).
CASES = [pytest.param(op, act, value, where, training)
         for op, (_, _, acts) in OPS.items() for act in acts
         for value in VALUES for where in WHERE
         for training in ((True, False) if _make_params(op)[1] else (True,))]


# The other activations where each path is position-sensitive: the plain conv epilogue
# (saving the pre-activation), the eval fused ops (BN folded, the activation in the conv
# or depthwise epilogue) with the non-finite input, and the training BN backward kernels
# (the fused op, the next conv's prologue) with the non-finite output gradient.
NEW_GRID = [("conv2d", True, where) for where in WHERE] + [
    ("fused_conv_bn_act", False, "input"), ("fused_depthwise_bn_act", False, "input"),
    ("fused_conv_bn_act", True, "grad"), ("conv_bn_deferred", True, "grad")]
CASES += [pytest.param(op, act, value, where, training)
          for act in NEW_ACTIVATIONS for op, training, where in NEW_GRID for value in VALUES]


@pytest.mark.parametrize("op,activation,value,where,training", CASES,
                         ids=lambda v: {True: "train", False: "eval"}.get(v, str(v)) if isinstance(v, bool) else str(v))
def test_nonfinite_propagates_as_in_pytorch(op, activation, value, where, training):
    ours = _run(op, activation, VALUES[value], where, "triton", training)
    ref = _run(op, activation, VALUES[value], where, "torch", training)
    _assert_same_nonfinite(ours[0], ref[0], "output")
    for i, (g, g_ref) in enumerate(zip(ours[1], ref[1])):
        _assert_same_nonfinite(g, g_ref, f"grad_{i}")
    for i, (s, s_ref) in enumerate(zip(ours[2], ref[2])):
        _assert_same_nonfinite(s, s_ref, f"running_stat_{i}")
