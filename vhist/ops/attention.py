"""Scaled dot-product attention on vhist's FlashAttention-2 kernels (Dao, 2023):
launchers, torch.library registration and autograd.

Backends: ``triton`` (:mod:`vhist.kernels.attention`: one forward kernel; a backward of
three, the ``Delta = rowsum(dO * O)`` preprocessing, dK/dV over key blocks and dQ over
query blocks, so no gradient is reduced with atomics) and ``torch``
(``F.scaled_dot_product_attention``). The kernels take the non-causal case without a
mask or dropout; :func:`scaled_dot_product_attention` raises on anything else on the
triton backend instead of falling back. Registered as ``vhist::attention_fwd`` /
``_bwd`` with fake implementations.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from vhist import reference
from vhist.ops._dispatch import check_float_dtype, check_same_device, dispatch
from vhist.ops.common import acc_dtype, cdiv, next_power_of_2
from vhist.ops.common import tl_acc as _tl_acc
from vhist.ops.launch_cache import Launch, lookup, new_cache
from vhist.ops.op_call import custom_op

OP = "attention"
# Head dims the kernels take (the head dim is padded to a power of two >= 16 in tiles).
MAX_HEAD_DIM = 256


def matmul_allow_tf32() -> bool:
    """``torch.backends.cuda.matmul.allow_tf32``, which fp32 attention follows as
    PyTorch's matmuls (and SDPA's math backend) do."""
    return torch._C._get_cublas_allow_tf32()


def attention_blocks(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and warps of the kernels, fixed by the head dim and dtype (the online
    softmax's order, and with it the bits, must not depend on a tuned config):
    (BLOCK_M, BLOCK_N) = (128, 64) queries by keys forward, (64, 64) backward, 4 warps up
    to head dim 64 and 8 above; fp32 smaller (64 x 32, 32 x 32 or 16 x 16 above head dim
    64) on 8 warps; fp64's FMA path holds a BLOCK x BLOCK_D x BLOCK product
    in registers and takes 16 x 16 tiles."""
    block_d = max(16, next_power_of_2(head_dim))
    if dtype == torch.float64:
        return dict(fwd=(16, 16, 4, 1), bwd=(16, 16, 4, 1), BLOCK_D=block_d)
    warps = 4 if block_d <= 64 else 8
    if dtype == torch.float32:
        # fp32 tiles are twice the bytes and, without TF32, FMA products: smaller tiles
        # on 8 warps (the 16-bit ones spill; static, sm_90 compile).
        return dict(fwd=(64, 32, 8, 2), bwd=(32, 32, 8, 2) if block_d <= 64 else (16, 16, 8, 2), BLOCK_D=block_d)
    return dict(fwd=(128, 64, warps, 3), bwd=(64, 64, warps, 2), BLOCK_D=block_d)


def _precision(dtype: torch.dtype, allow_tf32: bool) -> dict:
    fp64 = dtype == torch.float64
    tf32 = dtype != torch.float32 or allow_tf32
    return dict(FMA=fp64, INPUT_PRECISION="tf32" if tf32 and not fp64 else "ieee", ACC=_tl_acc(dtype))


def _build_fwd(b, h, lq, lk, d, q_strides, k_strides, v_strides, o_strides, dtype, allow_tf32, scale):
    from vhist.kernels import attention as kernels

    blocks = attention_blocks(d, dtype)
    block_m, block_n, warps, stages = blocks["fwd"]
    return Launch(kernels.attention_fwd, (cdiv(lq, block_m), b * h),
                  (h, lq, lk, d, *q_strides, *k_strides, *v_strides, *o_strides, scale * math.log2(math.e)),
                  **_precision(dtype, allow_tf32), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=blocks["BLOCK_D"],
                  num_warps=warps, num_stages=stages)


def _build_bwd(b, h, lq, lk, d, q_strides, k_strides, v_strides, o_strides, do_strides, dq_strides, dk_strides, dtype,
               allow_tf32, scale):
    from vhist.kernels import attention as kernels

    blocks = attention_blocks(d, dtype)
    block_m, block_n, warps, stages = blocks["bwd"]
    block_d, precision = blocks["BLOCK_D"], _precision(dtype, allow_tf32)
    pre = Launch(kernels.attention_bwd_preprocess, (cdiv(lq, block_m), b * h), (h, lq, d, *o_strides, *do_strides),
                 ACC=precision["ACC"], BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    strides = (*q_strides, *k_strides, *v_strides, *do_strides)
    scales = (scale, scale * math.log2(math.e))
    common = dict(**precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    dkdv = Launch(kernels.attention_bwd_dkdv, (cdiv(lk, block_n), b * h),
                  (h, lq, lk, d, *strides, *dk_strides, *scales), **common)
    dq = Launch(kernels.attention_bwd_dq, (cdiv(lq, block_m), b * h), (h, lq, lk, d, *strides, *dq_strides, *scales),
                **common)
    return pre, dkdv, dq


_FWD, _BWD = new_cache(), new_cache()


def _heads_last_empty(like: torch.Tensor, length: int) -> torch.Tensor:
    """An uninitialized (B, H, length, D) tensor laid out as (B, length, H, D), so that
    ``out.transpose(1, 2).reshape(B, length, H * D)`` (the heads merged for the output
    projection) is a view, as with PyTorch's flash backend."""
    b, h, _, d = like.shape
    return like.new_empty((b, length, h, d)).permute(0, 2, 1, 3)


@custom_op("vhist::attention_fwd", mutates_args=())
def attention_fwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward on (B, H, L, D) tensors of any strides.

    Returns:
        (output (B, H, LQ, D), laid out as (B, LQ, H, D); lse2 (B * H, LQ), the rows'
        base-2 log-sum-exp of ``scale * log2(e) * Q K^T``, in fp32 (fp64 for fp64)).
    """
    b, h, lq, d = query.shape
    lk = key.shape[2]
    output = _heads_last_empty(query, lq)
    lse = query.new_empty((b * h, lq), dtype=acc_dtype(query.dtype))
    key_ = (b, h, lq, lk, d, query.stride(), key.stride(), value.stride(), output.stride(), query.dtype,
            matmul_allow_tf32(), scale)
    lookup(_FWD, key_, _build_fwd, *key_)(query, key, value, output, lse)
    return output, lse


@custom_op("vhist::attention_bwd", mutates_args=())
def attention_bwd(grad_output: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  output: torch.Tensor, lse: torch.Tensor, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward: (grad_query, grad_key, grad_value), each laid out as
    (B, L, H, D) like the output; P is recomputed block by block from ``lse``."""
    b, h, lq, d = query.shape
    lk = key.shape[2]
    grad_query, grad_key, grad_value = _heads_last_empty(query, lq), _heads_last_empty(key, lk), \
        _heads_last_empty(key, lk)
    key_ = (b, h, lq, lk, d, query.stride(), key.stride(), value.stride(), output.stride(), grad_output.stride(),
            grad_query.stride(), grad_key.stride(), query.dtype, matmul_allow_tf32(), scale)
    pre, dkdv, dq = lookup(_BWD, key_, _build_bwd, *key_)
    delta = torch.empty_like(lse)
    pre(output, grad_output, delta)
    dkdv(query, key, value, grad_output, lse, delta, grad_key, grad_value)
    dq(query, key, value, grad_output, lse, delta, grad_query)
    return grad_query, grad_key, grad_value


@attention_fwd.register_fake
def _fwd_fake(query, key, value, scale):
    b, h, lq, _ = query.shape
    return _heads_last_empty(query, lq), query.new_empty((b * h, lq), dtype=acc_dtype(query.dtype))


@attention_bwd.register_fake
def _bwd_fake(grad_output, query, key, value, output, lse, scale):
    lq, lk = query.shape[2], key.shape[2]
    return _heads_last_empty(query, lq), _heads_last_empty(key, lk), _heads_last_empty(key, lk)


class AttentionFunction(torch.autograd.Function):
    """Autograd of FlashAttention-2: saves q, k, v, the output and the log-sum-exp (no
    (L_q, L_k) matrix)."""

    @staticmethod
    def forward(ctx, query, key, value, scale):
        output, lse = attention_fwd(query, key, value, scale)
        ctx.save_for_backward(query, key, value, output, lse)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, lse = ctx.saved_tensors
        grads = attention_bwd(grad_output, query, key, value, output, lse, ctx.scale)
        return (*grads, None)


# ----------------------------------------------------------------------------- public op


def _check_inputs(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_float_dtype(OP, name, t)
    check_same_device(OP, query=query, key=key, value=value)
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"{OP}: query, key and value must share a dtype, got {query.dtype}, {key.dtype}, "
                         f"{value.dtype}")
    if query.dim() not in (3, 4) or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"{OP}: expected 3-D (N, L, E) or 4-D (N, H, L, E) query, key and value, got shapes "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    lead = query.shape[:-2]
    if key.shape[:-2] != lead or value.shape[:-2] != lead:
        raise ValueError(f"{OP}: query, key and value must have the same batch and head dims (no broadcasting or "
                         f"grouped-query attention), got {tuple(query.shape)}, {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"{OP}: key and value must have the same sequence length, got {key.shape[-2]} and "
                         f"{value.shape[-2]}")
    d = query.shape[-1]
    if key.shape[-1] != d or value.shape[-1] != d:
        raise ValueError(f"{OP}: query, key and value must share the head dim, got {query.shape[-1]}, "
                         f"{key.shape[-1]}, {value.shape[-1]}")


def _attention_triton(query, key, value, scale):
    d = query.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{OP}: the triton kernels take head dims 1 to {MAX_HEAD_DIM}, got {d}")
    if key.shape[-2] == 0:
        raise ValueError(f"{OP}: the triton kernels need at least one key (got an empty key sequence)")
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    if query.numel() == 0:
        out = F.scaled_dot_product_attention(query, key, value, scale=scale)
    else:
        out = AttentionFunction.apply(query, key, value, float(scale))
    return out.squeeze(1) if squeeze else out


IMPLS = {"triton": _attention_triton, "torch": reference.attention}


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
              scale: Optional[float] = None) -> torch.Tensor:
    """``softmax(scale * Q K^T) V`` over the last two dims (non-causal, no mask, no
    dropout), FlashAttention-2 (Dao, 2023) on the triton backend.

    Args:
        query: (N, H, LQ, D) or (N, LQ, D), any strides (e.g. slices of a fused qkv
            projection, read in place).
        key, value: (N, H, LK, D) or (N, LK, D); LK may differ from LQ.
        scale: defaults to 1 / sqrt(D), as PyTorch's.

    Returns:
        (N, H, LQ, D) (or (N, LQ, D)) in the inputs' dtype; on the triton backend laid out
        as (N, LQ, H, D), so merging the heads is a view.
    """
    _check_inputs(query, key, value)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return dispatch(OP, IMPLS, query.device)(query, key, value, scale)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s signature. The torch backend is that function
    (every argument); the triton backend runs :func:`attention` and raises
    ``NotImplementedError`` for a mask, dropout, ``is_causal`` or ``enable_gqa`` rather
    than falling back."""
    from vhist.backend import resolve_backend

    if resolve_backend(query.device) == "torch":
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    unsupported = [name for name, given in (("attn_mask", attn_mask is not None), ("dropout_p", dropout_p != 0.0),
                                            ("is_causal", bool(is_causal)), ("enable_gqa", bool(enable_gqa)))
                   if given]
    if unsupported:
        raise NotImplementedError(f"vhist scaled_dot_product_attention: the triton kernels take the non-causal case "
                                  f"without a mask, dropout or grouped-query attention; got {', '.join(unsupported)} "
                                  f"(use the torch backend for these)")
    return attention(query, key, value, scale=scale)
