"""BatchNorm + activation in the next conv's prologue (vhist.ops.bn_prologue): deferred
chains on the triton backend against the eager composition
``conv(act(bn(conv(x) + b)))`` (outputs, every gradient, running statistics), in
training and eval; gradcheck in fp64; torch.compile; the models that use it."""
import copy

import pytest
import torch
from torch.autograd import gradcheck

import vhist
from vhist.ops import DeferredBNAct, conv_bn_deferred

from conftest import DEVICE
from utils import assert_close, assert_low_precision_results

TOL = dict(atol=1e-4, rtol=1e-4)
GRAD_TOL = dict(atol=5e-4, rtol=5e-4)

CHAINS = [
    # (N, C0, H, [(C_out, kernel, stride, padding, groups, activation, conv bias)...]), the
    # last layer is the terminal fused op (no bias), the others deferred producers.
    (2, 5, 6, [(6, 3, 1, 1, 1, "relu", False), (7, 3, 2, 1, 1, "relu", False)]),        # 3x3 -> 3x3 s2
    (2, 6, 5, [(8, 1, 1, 0, 1, "relu6", True), (8, 3, 1, 1, 2, None, False)]),         # bias, relu6, groups 2
    (1, 4, 7, [(6, 3, 2, 1, 1, None, False), (6, 1, 1, 0, 1, "relu", False)]),          # no activation
    (2, 5, 6, [(6, 1, 1, 0, 1, "relu", False), (6, 3, 1, 1, 1, "relu", False),         # a bottleneck:
               (8, 1, 1, 0, 1, "relu", False)]),                                         # 1x1, 3x3, 1x1 + res
]


def _params(chain, dtype=torch.float32):
    n, c, h, layers = chain
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, h, generator=gen, dtype=dtype)
    params = []
    for c_out, k, _, _, groups, _, bias in layers:
        w = torch.randn(c_out, c // groups, k, k, generator=gen, dtype=dtype) * 0.4
        b = torch.randn(c_out, generator=gen, dtype=dtype) if bias else None
        gamma, beta = torch.rand(c_out, generator=gen, dtype=dtype) + 0.5, torch.randn(c_out, generator=gen,
                                                                                        dtype=dtype)
        params.append((w, b, gamma, beta))
        c = c_out
    return x, params


def _run(chain, backend, training=True, residual=False, channels_last=True):
    """The chain on ``backend`` (deferred producers, then the terminal fused op); returns
    (output, leaves, their gradients, running statistics)."""
    x, params = _params(chain)
    x = x.to(DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    leaves = [x.requires_grad_()]
    for p in params:
        leaves += [t.to(DEVICE).requires_grad_() for t in p if t is not None]
    it = iter(leaves[1:])
    stats, out = [], x
    layers = chain[3]
    res = None
    if residual:
        res = torch.randn(*_out_shape(chain), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with vhist.use_backend(backend):
        for i, ((c_out, k, stride, pad, groups, act, has_bias), p) in enumerate(zip(layers, params)):
            w = next(it)
            b = next(it) if has_bias else None
            gamma, beta = next(it), next(it)
            rm, rv = torch.zeros(c_out, device=DEVICE), torch.ones(c_out, device=DEVICE)
            stats += [rm, rv]
            kw = dict(stride=stride, padding=pad, groups=groups, training=training, momentum=0.1, eps=1e-5,
                      activation=act)
            if i < len(layers) - 1:
                out = conv_bn_deferred(out, w, gamma, beta, rm, rv, bias=b, **kw)
                assert isinstance(out, DeferredBNAct) == (backend == "triton" and training)
            else:
                out = vhist.ops.fused_conv_bn_act(out, w, gamma, beta, rm, rv, residual=res, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return out, grads, stats


def _out_shape(chain):
    n, _, h, layers = chain
    for c_out, k, stride, pad, _, _, _ in layers:
        h = (h + 2 * pad - k) // stride + 1
    return n, layers[-1][0], h, h


def _assert_same(ours, ref, tol=TOL, grad_tol=GRAD_TOL):
    assert_close(ours[0], ref[0], name="output", **tol)
    for i, (g, g_ref) in enumerate(zip(ours[1], ref[1])):
        if g_ref is None:
            assert g is None or g.abs().max() < 1e-5, i
            continue
        assert_close(g, g_ref, name=f"grad_{i}", **grad_tol)
    for i, (s, s_ref) in enumerate(zip(ours[2], ref[2])):
        assert_close(s, s_ref, name=f"running_stat_{i}", **tol)


@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: "-".join(f"{lay[0]}k{lay[1]}s{lay[2]}" for lay in c[3]))
def test_deferred_chain_matches_eager_in_training(chain):
    """Forward, the gradients of the input, every conv weight and bias, every BN's
    gamma and beta, and the running statistics."""
    _assert_same(_run(chain, "triton"), _run(chain, "torch"))


def test_deferred_chain_with_residual_and_nchw_input():
    """A bottleneck's shape: deferred 1x1, deferred 3x3, then 1x1 + BN + residual + ReLU,
    from an NCHW input."""
    chain = CHAINS[3]
    _assert_same(_run(chain, "triton", residual=True, channels_last=False),
                 _run(chain, "torch", residual=True, channels_last=False))


def test_deferred_chain_is_deterministic():
    """Bitwise equal between runs: output, gradients and running statistics (partials
    and their merge order are fixed by the shape)."""
    first, second = _run(CHAINS[3], "triton", residual=True), _run(CHAINS[3], "triton", residual=True)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]) if a is not None)
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))


def test_deferred_chain_in_eval_is_the_folded_conv():
    """Eval: no deferral, each producer is the folded conv with its activation (the conv
    bias folded too), against eval-mode BatchNorm."""
    chain = CHAINS[1]
    out, _, _ = _run(chain, "triton", training=False)
    ref, _, _ = _run(chain, "torch", training=False)
    assert_close(out, ref, name="eval output", **TOL)


def test_deferred_is_not_made_on_the_torch_backend_or_in_eval():
    x, ((w, b, gamma, beta),) = _params((2, 5, 6, [(6, 3, 1, 1, 1, "relu", True)]))
    for backend, training in (("torch", True), ("triton", False)):
        with vhist.use_backend(backend):
            y = conv_bn_deferred(x, w, gamma, beta, torch.zeros(6), torch.ones(6), bias=b, padding=1,
                                 training=training)
        assert isinstance(y, torch.Tensor)


def test_stem_consumer_applies_the_deferred_input_first():
    """A consumer with at most 4 input channels runs the stem path, which has no
    prologue: the deferred input is applied first, with the same result."""
    chain = (2, 5, 6, [(3, 3, 1, 1, 1, "relu", False), (4, 3, 1, 1, 1, "relu", False)])
    _assert_same(_run(chain, "triton"), _run(chain, "torch"))


def test_deferred_materialize_is_bn_act():
    """DeferredBNAct.materialize (one apply pass) is act(BN(conv_output)) with the batch
    statistics, gradients through them included."""
    x, ((w, _, gamma, beta),) = _params((2, 5, 6, [(6, 3, 1, 1, 1, "relu6", False)]))
    outs = []
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, w, gamma, beta)]
        with vhist.use_backend(backend):
            y = conv_bn_deferred(leaves[0], leaves[1], leaves[2], leaves[3], None, None, padding=1,
                                 activation="relu6")
            y = vhist.ops.bn_prologue.as_tensor(y)
        outs.append((y, torch.autograd.grad(y, leaves, torch.cos(torch.arange(y.numel()).view(y.shape).float())),
                     []))
    _assert_same(*outs)


def test_deferred_chain_gradcheck(triton_backend):
    """fp64 gradcheck of a deferred producer consumed by the terminal fused op, through
    the input, both weights, the conv bias and both BN's affine parameters."""
    gen = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(2, 3, 4, 4, generator=gen, **f64).to(DEVICE)
    w1 = (torch.randn(5, 3, 3, 3, generator=gen, **f64) * 0.5).to(DEVICE)
    b1 = torch.randn(5, generator=gen, **f64).to(DEVICE)
    w2 = (torch.randn(4, 5, 3, 3, generator=gen, **f64) * 0.5).to(DEVICE)
    g1, be1 = (torch.rand(5, generator=gen, **f64) + 0.5).to(DEVICE), torch.randn(5, generator=gen, **f64).to(DEVICE)
    g2, be2 = (torch.rand(4, generator=gen, **f64) + 0.5).to(DEVICE), torch.randn(4, generator=gen, **f64).to(DEVICE)

    def chain(x, w1, b1, g1, be1, w2, g2, be2):
        d = conv_bn_deferred(x, w1, g1, be1, None, None, bias=b1, padding=1, activation="relu")
        assert isinstance(d, DeferredBNAct)
        return vhist.ops.fused_conv_bn_act(d, w2, g2, be2, None, None, stride=2, padding=1, activation=None)

    inputs = tuple(t.requires_grad_() for t in (x, w1, b1, g1, be1, w2, g2, be2))
    assert gradcheck(chain, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_deferred_chain_compiles(triton_backend):
    """torch.compile(fullgraph=True) traces the registered ops (conv_bn_stats, bn_act)
    and matches eager, gradients and running statistics included."""
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    x, ((w1, _, g1, be1), (w2, _, g2, be2)) = _params(CHAINS[0])

    def chain(x, w1, g1, be1, w2, g2, be2, rm1, rv1, rm2, rv2):
        d = conv_bn_deferred(x, w1, g1, be1, rm1, rv1, padding=1)
        return vhist.ops.fused_conv_bn_act(d, w2, g2, be2, rm2, rv2, stride=2, padding=1)

    compiled = torch.compile(chain, fullgraph=True, backend=backend)
    outs = []
    for fn in (chain, compiled):
        leaves = [t.to(DEVICE).clone().requires_grad_() for t in (x, w1, g1, be1, w2, g2, be2)]
        stats = [torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE), torch.zeros(7, device=DEVICE),
                 torch.ones(7, device=DEVICE)]
        y = fn(*leaves, *stats)
        outs.append((y, torch.autograd.grad(y, leaves, torch.ones_like(y)), stats))
    _assert_same(outs[1], outs[0])


def test_models_use_the_prologue():
    """ResNet hands every block pair but the last, VGG-BN every conv followed by a conv,
    to the next conv's prologue; a tiny ResNet trains the same on triton as on torch."""
    counts = {name: vhist.models.prologue_pairs(vhist.create_model(name, num_classes=4, image_size=32,
                                                                   channel_divisor=16))
              for name in ("resnet18", "resnet50", "vgg16_bn", "vgg16")}
    assert counts == {"resnet18": 8, "resnet50": 32, "vgg16_bn": 8, "vgg16": 0}
    torch.manual_seed(0)
    model = vhist.create_model("resnet18", num_classes=4, image_size=32, channel_divisor=8).train()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    results = []
    for backend, m in (("triton", model), ("torch", ref)):
        with vhist.use_backend(backend):
            y = m(x.to(DEVICE))
        y.pow(2).sum().backward()
        results.append((y, [p.grad for p in m.parameters()], list(m.buffers())))
    _assert_same(*results, grad_tol=dict(atol=2e-3, rtol=2e-3))


def test_deferred_bad_input():
    x, ((w, _, gamma, beta),) = _params((2, 5, 6, [(6, 3, 1, 1, 1, "relu", False)]))
    with vhist.use_backend("triton"):
        with pytest.raises(ValueError, match="activation"):
            conv_bn_deferred(x, w, gamma, beta, None, None, activation="elu")
        with pytest.raises(ValueError, match="bn_weight"):
            conv_bn_deferred(x, w, gamma[:3], beta, None, None)
        d = conv_bn_deferred(x, w, gamma, beta, None, None, padding=1)
        with pytest.raises(ValueError):
            vhist.ops.fused_conv_bn_act(d, torch.randn(4, 6, 3, 3), None, None, None, None,
                                        residual=torch.randn(2, 4, 9, 9))


def _run_dtype(chain, backend, dtype):
    """The chain with its activations and conv weights in ``dtype`` (BN parameters fp32,
    as under autocast); (output, gradients of the input and conv weights) in fp32."""
    x, params = _params(chain)
    leaves = [x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last).requires_grad_()]
    weights = [p[0].to(DEVICE, dtype).requires_grad_() for p in params]
    out = leaves[0]
    with vhist.use_backend(backend):
        for i, ((c_out, k, stride, pad, groups, act, _), w, p) in enumerate(zip(chain[3], weights, params)):
            kw = dict(stride=stride, padding=pad, groups=groups, activation=act)
            gamma, beta = p[2].to(DEVICE), p[3].to(DEVICE)
            fn = conv_bn_deferred if i < len(chain[3]) - 1 else vhist.ops.fused_conv_bn_act
            out = fn(out, w, gamma, beta, None, None, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, leaves + weights, grad_out)
    return out.float(), [g.float() for g in grads]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("chain", CHAINS[:1] + CHAINS[3:], ids=["3x3-3x3s2", "bottleneck"])
def test_deferred_chain_low_precision(chain, dtype):
    """The three-way rule on the GPU (compiled kernels, tensor cores): the deferred chain
    in bf16/fp16 is within 2x (output) and 3x (gradients) of PyTorch's own error in the
    same dtype, against PyTorch in fp32."""
    assert_low_precision_results(_run_dtype(chain, "triton", dtype), _run_dtype(chain, "torch", dtype),
                                 _run_dtype(chain, "torch", torch.float32))
