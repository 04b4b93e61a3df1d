"""The bits of the BN statistics and gradient sums depend on the shape, never on the
autotune pick: every config a GPU would tune the reducing kernels over (the BN
statistics and gradient-sum kernels, the depthwise forward's statistics epilogue) gives
identical bits through the interpreter, for the forward statistics, the running
statistics and every backward sum.

The interpreter sums a tile's rows in an order set by the tile's shape alone; on a GPU
tl.sum's tree also follows the register layout (BLOCK_C, num_warps), which the
interpreter cannot show, so the shortlists are also held to one (tile, warps) per
reduction."""
import pytest
import torch
import triton

import vhist
from vhist.kernels import _config
from vhist.nn import functional as VF
from vhist.kernels import batch_norm as bn_kernels
from vhist.kernels import depthwise as dw_kernels
from vhist.ops import launch_cache

from conftest import DEVICE


def _with_config(kernel, config):
    """``kernel`` (an interpreted, heuristics-fixed kernel) pinned to ``config``."""
    return triton.heuristics({name: (lambda _args, v=value: v) for name, value in config.kwargs.items()})(kernel.fn)


def _spec(config):
    return tuple(sorted(config.kwargs.items())), config.num_warps


def _bn_step(x, op):
    """Forward and backward of ``op`` on ``x``: (output, gradients, running statistics)."""
    x = x.clone().requires_grad_()
    c = x.shape[1]
    gen = torch.Generator().manual_seed(1)
    w = (torch.rand(c, generator=gen) + 0.5).to(DEVICE).requires_grad_()
    b = torch.randn(c, generator=gen).to(DEVICE).requires_grad_()
    rm, rv = torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
    with vhist.use_backend("triton"):
        out = op(x, w, b, rm, rv)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    return (out.detach(), *torch.autograd.grad(out, (x, w, b), grad), rm, rv)


def _bn(x, w, b, rm, rv):
    return VF.batch_norm(x, rm, rv, w, b, training=True)


INPUTS = [
    # (shape, channels_last): why
    ((3, 5, 37, 29), False),   # NCHW: the spatially contiguous family, S not a power of two
    ((3, 70, 11, 13), True),   # channels_last: the channels contiguous family, C over one tile
    ((600, 6), False),         # (N, C): channels contiguous, several chunks
]


@pytest.mark.parametrize("shape,channels_last", INPUTS, ids=lambda v: str(v))
def test_bn_statistics_bits_do_not_depend_on_the_config(shape, channels_last, monkeypatch):
    """Every config of the statistics and gradient-sum kernels (each memory-format family)
    gives the same bits: output, input/weight/bias gradients, running statistics."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    family = 0 if channels_last or x.dim() == 2 else 1
    runs = {}
    stats_configs = bn_kernels.bn_fwd_stats[family].configs
    reduce_configs = bn_kernels.bn_bwd_reduce[family].configs
    for stats_config in stats_configs:
        for reduce_config in reduce_configs:
            kernels = {"bn_fwd_stats": _with_config(bn_kernels.bn_fwd_stats[family], stats_config),
                       "bn_bwd_reduce": _with_config(bn_kernels.bn_bwd_reduce[family], reduce_config)}
            for name, kernel in kernels.items():
                pair = list(getattr(bn_kernels, name))
                pair[family] = kernel
                monkeypatch.setattr(bn_kernels, name, tuple(pair))
            launch_cache.clear()
            runs[(_spec(stats_config), _spec(reduce_config))] = _bn_step(x, _bn)
    launch_cache.clear()
    (first_key, first), *rest = runs.items()
    for key, run in rest:
        for i, (a, b) in enumerate(zip(run, first)):
            assert torch.equal(a, b), f"result {i} differs between configs {key} and {first_key}"
    # One (tile, warps) each: on a GPU any other would change tl.sum's tree.
    assert len(stats_configs) == 1 and len(reduce_configs) == 1, (stats_configs, reduce_configs)


def test_depthwise_statistics_epilogue_bits_do_not_depend_on_the_config(monkeypatch):
    """The fused depthwise op's statistics (its forward epilogue) under every config the
    shortlist keeps for a launch with STATS: the same bits; and that shortlist is one
    config (the epilogue's tl.sum tree follows the layout on a GPU)."""
    configs = _config.shortlist("_depthwise_fwd_kernel", dw_kernels.FWD_CONFIGS, {"STATS": True, "BLOCK_P": 64})
    x = torch.randn(2, 24, 9, 11, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(24, 1, 3, 3, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_()

    def op(x, w, b, rm, rv):
        return VF.fused_depthwise_bn_act(x, wt, w, b, rm, rv, padding=1, training=True)

    runs = []
    for config in dw_kernels.FWD_CONFIGS:  # every config, not just the shortlist: all must agree here
        monkeypatch.setattr(dw_kernels, "depthwise_fwd", _with_config(dw_kernels.depthwise_fwd, config))
        launch_cache.clear()
        runs.append(_bn_step(x, op))
    launch_cache.clear()
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
    assert len({_spec(c) for c in configs}) == 1, configs
