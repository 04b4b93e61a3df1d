"""Local Response Normalization (Krizhevsky et al., 2012): launchers, torch.library
registration and autograd.

Backends: ``triton`` (:mod:`vhist.kernels.local_response_norm`), ``cuda``
(``csrc/local_response_norm/``, built on first use by :mod:`vhist.ops._cuda_ext`) and
``torch`` (``F.local_response_norm``). Both kernel backends run one kernel forward and
one backward; the backward recomputes the window sums from the input instead of reading
a saved scale. They are registered as the custom ops ``vhist::local_response_norm_fwd``
/ ``_bwd`` (triton) and ``vhist::local_response_norm_cuda_fwd`` / ``_bwd`` (cuda), with
fake implementations so ``torch.compile(fullgraph=True)`` traces them.
"""
from __future__ import annotations

import numbers

import torch

from vhist import reference
from vhist.ops._dispatch import check_float_dtype, dispatch
from vhist.ops.common import cdiv, next_power_of_2
from vhist.ops.common import dense_layout, is_channels_last_dense, like_layout
from vhist.ops.launch_cache import Launch, lookup, new_cache
from vhist.ops.common import tl_acc as _tl_acc  # the launchers' name for it
from vhist.ops.op_call import custom_op

OP = "local_response_norm"
# Channels a kernel tile holds at most (every channel of a position, in registers).
MAX_CHANNELS = 4096


def window_bounds(size: int) -> tuple[int, int]:
    """(LO, HI): channel c's window is [c - LO, c + HI], as PyTorch pads the channel axis
    by (size // 2, (size - 1) // 2) before its average pool."""
    return size // 2, (size - 1) // 2


def tile_channels(channels: int) -> int:
    """BLOCK_C of the kernels' [positions x channels] tiles: every channel of a position
    in one tile (the next power of two >= C, at least 4: the Triton window sums work on
    groups of 4 channels), so the window sums never leave registers.

    Raises:
        ValueError: C exceeds MAX_CHANNELS (a row would not fit in registers).
    """
    if channels > MAX_CHANNELS:
        raise ValueError(f"{OP}: the triton and cuda kernels take at most {MAX_CHANNELS} channels, got "
                         f"{channels}; use the torch backend")
    return max(4, next_power_of_2(channels))


def lrn_geometry(x: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(N, C, S, stride_n, stride_c, stride_s) of a dense ``x`` seen as (N, C, S). With
    channels innermost (channels_last, or no spatial extent) N folds into S."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    if s == 1 or (not x.is_contiguous() and is_channels_last_dense(x)):
        return 1, c, n * s, 0, 1, c
    return n, c, s, c * s, s, 1


def _build_launch(kernel, shape, strides, dtype, size, alpha, beta, k, device, like) -> Launch:
    from vhist.kernels.local_response_norm import block_s

    n, c, s, stride_n, stride_c, stride_s = lrn_geometry(like)
    block_c = tile_channels(c)
    lo, hi = window_bounds(size)

    def grid(meta):
        return (n * cdiv(s, block_s(meta["TILE"], block_c)),)

    # Shifts beyond the tile's width add only zeros: clip them (huge sizes stay cheap).
    return Launch(kernel, grid, (n, c, s, stride_n, stride_c, stride_s, alpha / size, beta, k),
                  LO=min(lo, block_c - 1), HI=min(hi, block_c - 1), ACC=_tl_acc(dtype), BLOCK_C=block_c,
                  FULL_C=block_c == c)


_LAUNCHES = new_cache()


def _launch(kernel, tensors, size, alpha, beta, k, like):
    key = (kernel, like.shape, like.stride(), like.dtype, size, alpha, beta, k, like.device)
    lookup(_LAUNCHES, key, _build_launch, *key, like)(*tensors)


# ----------------------------------------------------------------------------- triton


@custom_op("vhist::local_response_norm_fwd", mutates_args=())
def local_response_norm_fwd(input: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """Forward of LRN on the Triton kernel; ``input`` is dense (contiguous or
    channels-last) and the output has its strides."""
    from vhist.kernels import local_response_norm as kernels

    output = torch.empty_like(input)
    _launch(kernels.lrn_fwd, (input, output), size, alpha, beta, k, input)
    return output


@custom_op("vhist::local_response_norm_bwd", mutates_args=())
def local_response_norm_bwd(grad_output: torch.Tensor, input: torch.Tensor, size: int, alpha: float,
                            beta: float, k: float) -> torch.Tensor:
    """Input gradient of LRN on the fused Triton kernel (window sums recomputed)."""
    from vhist.kernels import local_response_norm as kernels

    grad_output = like_layout(grad_output, input)
    grad_input = torch.empty_like(input)
    _launch(kernels.lrn_bwd, (input, grad_output, grad_input), size, alpha, beta, k, input)
    return grad_input


# One fake per pass, registered for its triton and cuda ops (the same contract): the
# output and the input gradient have the input's shape, dtype and strides.


def _fwd_fake(input, size, alpha, beta, k):
    return torch.empty_like(input)


def _bwd_fake(grad_output, input, size, alpha, beta, k):
    return torch.empty_like(input)


local_response_norm_fwd.register_fake(_fwd_fake)
local_response_norm_bwd.register_fake(_bwd_fake)


# ----------------------------------------------------------------------------- cuda


def _cuda_extension():
    from vhist.ops._cuda_ext import csrc_path, load_extension

    return load_extension(OP, [csrc_path("local_response_norm/local_response_norm.cpp"),
                               csrc_path("local_response_norm/local_response_norm_kernel.cu")])


@custom_op("vhist::local_response_norm_cuda_fwd", mutates_args=())
def local_response_norm_cuda_fwd(input: torch.Tensor, size: int, alpha: float, beta: float,
                                 k: float) -> torch.Tensor:
    """Forward of LRN on the CUDA C++ kernel (csrc/local_response_norm)."""
    tile_channels(input.shape[1])
    return _cuda_extension().fwd(input, size, alpha, beta, k)


@custom_op("vhist::local_response_norm_cuda_bwd", mutates_args=())
def local_response_norm_cuda_bwd(grad_output: torch.Tensor, input: torch.Tensor, size: int, alpha: float,
                                 beta: float, k: float) -> torch.Tensor:
    """Input gradient of LRN on the fused CUDA C++ kernel."""
    grad_output = like_layout(grad_output, input)
    tile_channels(input.shape[1])
    return _cuda_extension().bwd(grad_output, input, size, alpha, beta, k)


local_response_norm_cuda_fwd.register_fake(_fwd_fake)
local_response_norm_cuda_bwd.register_fake(_bwd_fake)


_KERNELS = {
    "triton": (local_response_norm_fwd, local_response_norm_bwd),
    "cuda": (local_response_norm_cuda_fwd, local_response_norm_cuda_bwd),
}


class LocalResponseNormFunction(torch.autograd.Function):
    """Autograd for the kernel backends: saves only the input; the backward kernel
    recomputes the window sums."""

    @staticmethod
    def forward(ctx, input, size, alpha, beta, k, backend):
        fwd, _ = _KERNELS[backend]
        ctx.save_for_backward(input)
        ctx.args, ctx.backend = (size, alpha, beta, k), backend
        return fwd(input, size, alpha, beta, k)

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        _, bwd = _KERNELS[ctx.backend]
        grad_input = bwd(grad_output, input, *ctx.args)
        return grad_input, None, None, None, None, None


# ----------------------------------------------------------------------------- public op


def _check_inputs(input, size):
    check_float_dtype(OP, "input", input)
    if input.dim() < 3:
        raise ValueError(f"{OP}: expected a 3-D or higher input (N, C, ...), got {input.dim()}-D "
                         f"of shape {tuple(input.shape)}")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise TypeError(f"{OP}: size must be an int, got {type(size).__name__}")
    if size < 1:
        raise ValueError(f"{OP}: size must be >= 1, got {size}")


def _local_response_norm_triton(input, size, alpha, beta, k):
    tile_channels(input.shape[1])
    if input.numel() == 0:
        return input
    return LocalResponseNormFunction.apply(dense_layout(input), int(size), float(alpha), float(beta),
                                           float(k), "triton")


def _local_response_norm_cuda(input, size, alpha, beta, k):
    tile_channels(input.shape[1])
    if input.device.type != "cuda":
        raise RuntimeError(f"{OP}: the cuda backend needs CUDA tensors, got a tensor on {input.device}")
    if input.numel() == 0:
        return input
    _cuda_extension()  # build (or fail with the reason) before autograd sees the call
    return LocalResponseNormFunction.apply(dense_layout(input), int(size), float(alpha), float(beta),
                                           float(k), "cuda")


IMPLS = {"triton": _local_response_norm_triton, "cuda": _local_response_norm_cuda,
         "torch": reference.local_response_norm}


def local_response_norm(input: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> torch.Tensor:
    """Local Response Normalization across channels, as ``F.local_response_norm``.

    ``b_c = a_c / (k + alpha / size * sum_{j=c-size//2}^{c+(size-1)//2} a_j^2) ** beta``,
    the window clipped at the channel edges but still divided by ``size`` (Krizhevsky
    et al., 2012, section 3.3, with alpha divided by the window size as PyTorch does).
    The kernel backends compute the power as exp(-beta * log(.)), so they need a
    positive base: k > 0 and alpha >= 0, and hold every channel of a position in one
    tile, so they take at most ``MAX_CHANNELS`` (4096) channels.

    Args:
        input: (N, C, *spatial) with 1 to 3 spatial dims, contiguous or channels-last;
            the output keeps its memory format.
        size: number of neighbouring channels in the window (>= 1).
        alpha: multiplicative factor (divided by ``size``).
        beta: exponent.
        k: additive factor.

    Returns:
        The normalized tensor, same shape, dtype and memory format as ``input``.

    Raises:
        ValueError: on the triton or cuda backend, more than ``MAX_CHANNELS`` channels.
    """
    _check_inputs(input, size)
    impl = dispatch(OP, IMPLS, input.device)
    return impl(input, size, alpha, beta, k)
