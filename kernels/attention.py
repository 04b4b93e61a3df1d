"""Scaled dot-product attention, FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster
Attention with Better Parallelism and Work Partitioning"), non-causal, no mask, no dropout.

    S = scale Q K^T,  P = softmax(S) (rows),  O = P V

No (L_q, L_k) matrix ever reaches memory. Each tensor is addressed through its four
strides (batch, head, position, head dim), so the q, k and v slices of a fused qkv
projection are read in place. The head dim D is padded to BLOCK_D (a power of two, at
least 16 for the tensor-core dot) with masks; sequence ends are masked too.

The softmax works in base 2 (as FlashAttention-2's and Triton's fused-attention
tutorial's kernels do): s2 = S log2(e), P = exp2(s2 - lse2), and the saved per-row
statistic is lse2 = m + log2(l), the log-sum-exp in base 2.

fp64 (gradchecks) multiplies tiles with the FMA form of :func:`vhist.kernels.common.mma`;
fp32 follows torch.backends.cuda.matmul.allow_tf32 through INPUT_PRECISION; fp16 / bf16
feed P and dS to the tensor cores in the input dtype, accumulating in fp32.
"""
import triton
import triton.language as tl

from .common import mma


@triton.jit
def _rows_tile(Base, pid_bh, H, rows, L, D, stride_b, stride_h, stride_l, stride_d, BLOCK_D: tl.constexpr):
    """Pointers and mask of the [len(rows), BLOCK_D] tile of head pid_bh at ``rows``."""
    b, h = pid_bh // H, pid_bh % H
    d = tl.arange(0, BLOCK_D)
    # int64 offsets: a batch of activations can hold more than 2**31 elements.
    base = Base + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    ptrs = base + rows.to(tl.int64)[:, None] * stride_l + d[None, :] * stride_d
    return ptrs, (rows < L)[:, None] & (d < D)[None, :]


@triton.jit
def _cols_tile(Base, pid_bh, H, cols, L, D, stride_b, stride_h, stride_l, stride_d, BLOCK_D: tl.constexpr):
    """Pointers and mask of the transposed [BLOCK_D, len(cols)] tile (K^T, V^T)."""
    b, h = pid_bh // H, pid_bh % H
    d = tl.arange(0, BLOCK_D)
    base = Base + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    ptrs = base + d[:, None] * stride_d + cols.to(tl.int64)[None, :] * stride_l
    return ptrs, (d < D)[:, None] & (cols < L)[None, :]


# Forward (Dao, 2023, Algorithm 1): program (i, bh) owns query block i of head bh and
# streams the key/value blocks once, keeping the running row max m, the running sum l
# of exp2(s2 - m) and the unnormalized output in registers; each new block rescales them
# by exp2(m_old - m_new) (the online softmax, Milakov & Gimelshein, 2018). O = acc / l is
# written once, and lse2 = m + log2(l) is saved for the backward.
@triton.jit
def _attention_fwd_kernel(
    Q,    # (B, H, LQ, D) queries, any strides
    K,    # (B, H, LK, D) keys, any strides
    V,    # (B, H, LK, D) values, any strides
    O,    # (B, H, LQ, D) output, strides stride_o*
    LSE,  # (B * H, LQ) log2-sum-exp2 of each row of S log2(e), ACC
    H, LQ, LK, D,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    scale_log2,  # scale * log2(e)
    FMA: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ptrs, q_mask = _rows_tile(Q, pid_bh, H, rows, LQ, D, stride_qb, stride_qh, stride_ql, stride_qd, BLOCK_D)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start in range(0, LK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kt_ptrs, kt_mask = _cols_tile(K, pid_bh, H, cols, LK, D, stride_kb, stride_kh, stride_kl, stride_kd, BLOCK_D)
        kt = tl.load(kt_ptrs, mask=kt_mask, other=0.0)
        s = mma(tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC), q, kt, FMA, INPUT_PRECISION) * scale_log2
        s = tl.where((cols < LK)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_ptrs, v_mask = _rows_tile(V, pid_bh, H, cols, LK, D, stride_vb, stride_vh, stride_vl, stride_vd, BLOCK_D)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        acc = mma(acc * alpha[:, None], p.to(v.dtype), v, FMA, INPUT_PRECISION)
        m_i = m_new
    o = acc / l_i[:, None]
    o_ptrs, o_mask = _rows_tile(O, pid_bh, H, rows, LQ, D, stride_ob, stride_oh, stride_ol, stride_od, BLOCK_D)
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + pid_bh.to(tl.int64) * LQ + rows, m_i + tl.log2(l_i), mask=rows < LQ)


# Backward preprocessing (Dao, 2023, Algorithm 2, line 4): Delta_i = rowsum(dO_i * O_i),
# which equals rowsum(P_i * dP_i) and turns dS = P * (dP - Delta) into a blockwise
# formula.
@triton.jit
def _attention_bwd_preprocess_kernel(
    O,      # (B, H, LQ, D) forward output, strides stride_o*
    DO,     # (B, H, LQ, D) gradient of O, strides stride_do*
    Delta,  # (B * H, LQ) rowsum(dO * O), ACC
    H, LQ, D,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ptrs, mask = _rows_tile(O, pid_bh, H, rows, LQ, D, stride_ob, stride_oh, stride_ol, stride_od, BLOCK_D)
    do_ptrs, do_mask = _rows_tile(DO, pid_bh, H, rows, LQ, D, stride_dob, stride_doh, stride_dol, stride_dod,
                                  BLOCK_D)
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(ACC)
    do = tl.load(do_ptrs, mask=do_mask, other=0.0).to(ACC)
    tl.store(Delta + pid_bh.to(tl.int64) * LQ + rows, tl.sum(o * do, axis=1), mask=rows < LQ)


# dK, dV (Dao, 2023, Algorithm 2, the outer loop over key blocks): program (j, bh) holds
# key/value block j and streams every query block, recomputing P^T = exp2(s2^T - lse2)
# from the saved statistic: dV_j += P^T dO,  dP^T = V dO^T,  dS^T = P^T (dP^T - Delta),
# dK_j += scale dS^T Q. Each program owns its rows of dK and dV: no atomics, and the sum
# over query blocks runs in block order.
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V,  # forward inputs, strides stride_q* / stride_k* / stride_v*
    DO,       # (B, H, LQ, D) gradient of O, strides stride_do*
    LSE,      # (B * H, LQ) saved log2-sum-exp2, ACC
    Delta,    # (B * H, LQ) rowsum(dO * O), ACC
    DK, DV,   # (B, H, LK, D) key and value gradients, strides stride_dk*
    H, LQ, LK, D,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    scale, scale_log2,
    FMA: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ptrs, kv_mask = _rows_tile(K, pid_bh, H, keys, LK, D, stride_kb, stride_kh, stride_kl, stride_kd, BLOCK_D)
    v_ptrs, v_mask = _rows_tile(V, pid_bh, H, keys, LK, D, stride_vb, stride_vh, stride_vl, stride_vd, BLOCK_D)
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    row_base = pid_bh.to(tl.int64) * LQ
    for start in range(0, LQ, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < LQ
        qt_ptrs, qt_mask = _cols_tile(Q, pid_bh, H, rows, LQ, D, stride_qb, stride_qh, stride_ql, stride_qd, BLOCK_D)
        qt = tl.load(qt_ptrs, mask=qt_mask, other=0.0)
        lse = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)
        st = mma(tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC), k, qt, FMA, INPUT_PRECISION) * scale_log2
        pt = tl.where(row_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
        do_ptrs, do_mask = _rows_tile(DO, pid_bh, H, rows, LQ, D, stride_dob, stride_doh, stride_dol, stride_dod,
                                      BLOCK_D)
        do = tl.load(do_ptrs, mask=do_mask, other=0.0)
        dv = mma(dv, pt.to(do.dtype), do, FMA, INPUT_PRECISION)
        dpt = mma(tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC), v, tl.trans(do), FMA, INPUT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = mma(dk, dst.to(qt.dtype), tl.trans(qt), FMA, INPUT_PRECISION)
    dk_ptrs, dk_mask = _rows_tile(DK, pid_bh, H, keys, LK, D, stride_dkb, stride_dkh, stride_dkl, stride_dkd,
                                  BLOCK_D)
    dv_ptrs, dv_mask = _rows_tile(DV, pid_bh, H, keys, LK, D, stride_dkb, stride_dkh, stride_dkl, stride_dkd,
                                  BLOCK_D)
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=dk_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=dv_mask)


# dQ (Dao, 2023, Algorithm 2's dQ update, computed by its own kernel over query blocks
# instead of with atomic adds from the key-block programs): program (i, bh) holds query
# block i and streams every key block: dS = P (dO V^T - Delta), dQ_i += scale dS K.
# Deterministic: one program owns each row of dQ and sums the key blocks in order.
@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V,  # forward inputs, strides stride_q* / stride_k* / stride_v*
    DO,       # (B, H, LQ, D) gradient of O, strides stride_do*
    LSE,      # (B * H, LQ) saved log2-sum-exp2, ACC
    Delta,    # (B * H, LQ) rowsum(dO * O), ACC
    DQ,       # (B, H, LQ, D) query gradient, strides stride_dq*
    H, LQ, LK, D,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    scale, scale_log2,
    FMA: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    q_ptrs, q_mask = _rows_tile(Q, pid_bh, H, rows, LQ, D, stride_qb, stride_qh, stride_ql, stride_qd, BLOCK_D)
    # (No pointer/mask pair is unpacked into a throwaway name: a name assigned before the
    # loop and again inside it is loop-carried, and the tiles' shapes differ.)
    do_ptrs, do_mask = _rows_tile(DO, pid_bh, H, rows, LQ, D, stride_dob, stride_doh, stride_dol, stride_dod,
                                  BLOCK_D)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(do_ptrs, mask=do_mask, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * LQ + rows, mask=row_ok, other=0.0)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * LQ + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start in range(0, LK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kt_ptrs, kt_mask = _cols_tile(K, pid_bh, H, cols, LK, D, stride_kb, stride_kh, stride_kl, stride_kd, BLOCK_D)
        vt_ptrs, vt_mask = _cols_tile(V, pid_bh, H, cols, LK, D, stride_vb, stride_vh, stride_vl, stride_vd, BLOCK_D)
        kt = tl.load(kt_ptrs, mask=kt_mask, other=0.0)
        vt = tl.load(vt_ptrs, mask=vt_mask, other=0.0)
        s = mma(tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC), q, kt, FMA, INPUT_PRECISION) * scale_log2
        p = tl.where((cols < LK)[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = mma(tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC), do, vt, FMA, INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = mma(dq, ds.to(kt.dtype), tl.trans(kt), FMA, INPUT_PRECISION)
    dq_ptrs, dq_mask = _rows_tile(DQ, pid_bh, H, rows, LQ, D, stride_dqb, stride_dqh, stride_dql, stride_dqd, BLOCK_D)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=dq_mask)


attention_fwd = _attention_fwd_kernel
attention_bwd_preprocess = _attention_bwd_preprocess_kernel
attention_bwd_dkdv = _attention_bwd_dkdv_kernel
attention_bwd_dq = _attention_bwd_dq_kernel
