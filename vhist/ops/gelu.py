"""Bias + GELU (Hendrycks & Gimpel, 2016), the transformer MLP's epilogue: launchers,
torch.library registration and autograd.

Backends: ``triton`` (:mod:`vhist.kernels.gelu`) and ``torch`` (``F.gelu(x + b)``).
One elementwise kernel forward; one backward kernel that writes the input gradient and
per-program partials of the bias gradient, which a second small kernel sums in a fixed
order (deterministic). Registered as ``vhist::bias_gelu_fwd`` / ``_bwd`` with fakes.
"""
from __future__ import annotations

from typing import Optional

import torch

from vhist import reference
from vhist.ops._dispatch import autocast_inputs, check_float_dtype, check_same_device, dispatch
from vhist.ops.common import acc_dtype, cdiv, next_power_of_2, op_outputs, partials_sum_launch
from vhist.ops.common import tl_acc as _tl_acc
from vhist.ops.launch_cache import Launch, lookup, new_cache, scratch
from vhist.ops.op_call import custom_op

OP = "bias_gelu"
APPROXIMATIONS = ("none", "tanh")
# Tile of the elementwise kernels: up to TILE_N columns (ViT's 1536 and 3072 hidden
# widths are multiples of 512) by TILE // TILE_N rows.
TILE, TILE_N = 4096, 512
# Row-tile programs of the backward at most (rows of bias-gradient partials), fixed so
# that the partition, and the order of the sums, depends on the shape alone.
MAX_PARTIALS = 256


def tile_geometry(rows: int, width: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): TILE elements, 8 per thread (fixed by the shape)."""
    block_n = min(TILE_N, max(2, next_power_of_2(width)))
    block_m = max(1, min(TILE // block_n, next_power_of_2(max(rows, 1))))
    return block_m, block_n, min(8, max(1, block_m * block_n // 256))


def partition(rows: int, width: int) -> tuple[int, int]:
    """(P, TILES_PER_PROGRAM) of the backward's row tiles."""
    block_m, _, _ = tile_geometry(rows, width)
    tiles = cdiv(rows, block_m)
    per_program = cdiv(tiles, MAX_PARTIALS)
    return cdiv(tiles, per_program), per_program


def _build_fwd(m, n, has_bias, approximate, dtype):
    from vhist.kernels import gelu as kernels

    block_m, block_n, warps = tile_geometry(m, n)
    return Launch(kernels.bias_gelu_fwd, (cdiv(m, block_m), cdiv(n, block_n)), (m, n), HAS_BIAS=has_bias,
                  APPROXIMATE=approximate == "tanh", ACC=_tl_acc(dtype), BLOCK_M=block_m, BLOCK_N=block_n,
                  num_warps=warps)


def _build_bwd(m, n, has_bias, want_db, approximate, dtype):
    from vhist.kernels import gelu as kernels

    block_m, block_n, warps = tile_geometry(m, n)
    parts, per_program = partition(m, n)
    acc = _tl_acc(dtype)
    dx = Launch(kernels.bias_gelu_bwd, (parts, cdiv(n, block_n)), (m, n, per_program), HAS_BIAS=has_bias,
                COMPUTE_DB=want_db, APPROXIMATE=approximate == "tanh", ACC=acc, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=warps)
    return dx, partials_sum_launch(n, parts, False, want_db, acc), parts


_FWD, _BWD = new_cache(), new_cache()


@custom_op("vhist::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd(input: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> torch.Tensor:
    """``gelu(input + bias)`` on a contiguous 2-D (M, N) ``input``."""
    m, n = input.shape
    output = input.new_empty((m, n))
    key = (m, n, bias is not None, approximate, input.dtype)
    lookup(_FWD, key, _build_fwd, *key)(input, bias if bias is not None else input, output)
    return output


@custom_op("vhist::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(grad_output: torch.Tensor, input: torch.Tensor, bias: Optional[torch.Tensor], approximate: str,
                  bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_bias) of ``gelu(input + bias)``; grad_bias (the column sums of
    grad_input, fixed order) is an empty tensor unless ``bias_grad``."""
    m, n = input.shape
    want_db = bias_grad and bias is not None
    grad_output = grad_output.contiguous()
    key = (m, n, bias is not None, want_db, approximate, input.dtype)
    dx_launch, db_launch, parts = lookup(_BWD, key, _build_bwd, *key)
    grad_input = input.new_empty((m, n))
    (partial,) = scratch(dx_launch.scratch, input, lambda: (input.new_empty((parts, n), dtype=acc_dtype(input.dtype)),))
    dx_launch(grad_output, input, bias if bias is not None else input, grad_input, partial)
    grad_bias = None
    if want_db:
        grad_bias = bias.new_empty((n,))
        db_launch(partial, partial, grad_bias, grad_bias)
    return op_outputs(input, grad_input, grad_bias)


@bias_gelu_fwd.register_fake
def _fwd_fake(input, bias, approximate):
    return input.new_empty(input.shape)


@bias_gelu_bwd.register_fake
def _bwd_fake(grad_output, input, bias, approximate, bias_grad):
    grad_bias = bias.new_empty(bias.shape) if bias_grad and bias is not None else input.new_empty((0,))
    return input.new_empty(input.shape), grad_bias


class BiasGeluFunction(torch.autograd.Function):
    """Autograd of ``gelu(x + b)`` on (M, N) rows: saves x and b (z is recomputed)."""

    @staticmethod
    def forward(ctx, input, bias, approximate):
        ctx.save_for_backward(input, bias)
        ctx.approximate = approximate
        return bias_gelu_fwd(input, bias, approximate)

    @staticmethod
    def backward(ctx, grad_output):
        input, bias = ctx.saved_tensors
        want_db = bias is not None and ctx.needs_input_grad[1]
        grad_input, grad_bias = bias_gelu_bwd(grad_output, input, bias, ctx.approximate, want_db)
        return grad_input, grad_bias if want_db else None, None


def _check_inputs(input, bias, approximate):
    check_float_dtype(OP, "input", input)
    check_float_dtype(OP, "bias", bias)
    check_same_device(OP, input=input, bias=bias)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"{OP}: approximate must be 'none' or 'tanh', got {approximate!r}")
    if bias is not None:
        if input.dim() < 1 or tuple(bias.shape) != (input.shape[-1],):
            raise ValueError(f"{OP}: bias must have shape ({input.shape[-1] if input.dim() else '?'},) to match the "
                             f"input's last dimension, got {tuple(bias.shape)} for an input of shape "
                             f"{tuple(input.shape)}")
        if bias.dtype != input.dtype:
            raise ValueError(f"{OP}: bias dtype {bias.dtype} differs from the input's {input.dtype}")


def _bias_gelu_triton(input, bias, approximate):
    if input.numel() == 0:
        return reference.bias_gelu(input, bias, approximate)
    width = input.shape[-1] if input.dim() else 1
    y = BiasGeluFunction.apply(input.reshape(-1, width).contiguous(), bias, approximate)
    return y.view(input.shape)


IMPLS = {"triton": _bias_gelu_triton, "torch": reference.bias_gelu}


def bias_gelu(input: torch.Tensor, bias: Optional[torch.Tensor], approximate: str = "none") -> torch.Tensor:
    """``F.gelu(input + bias, approximate=...)`` in one kernel (and one backward kernel
    plus a small fixed-order bias-gradient sum): the MLP's first GEMM is run without its
    bias (``F.linear(x, W)``) and the bias is added here.

    Args:
        input: (*, N) float tensor; copied once if not contiguous.
        bias: (N,) in the input's dtype (cast to it under autocast), or None for plain
            GELU.
        approximate: ``'none'`` (erf) or ``'tanh'``, as ``F.gelu``.

    Returns:
        ``gelu(input + bias)``, contiguous, of ``input``'s shape and dtype.
    """
    # Under autocast the bias takes the GEMM output's dtype, as addmm's would.
    if bias is not None and bias.dtype != input.dtype:
        input, bias = autocast_inputs(input, bias)
    _check_inputs(input, bias, approximate)
    return dispatch(OP, IMPLS, input.device)(input, bias, approximate)


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu`` (Hendrycks & Gimpel, 2016) on vhist's kernel: :func:`bias_gelu` without a bias."""
    return bias_gelu(input, None, approximate)
