"""Bias + GELU kernels: the transformer MLP's epilogue after its first GEMM (Hendrycks &
Gimpel, 2016, "Gaussian Error Linear Units", Section 2), the GEMMs themselves staying on
cuBLAS.

    z = x + b,  erf form:   y = z Phi(z) = 0.5 z (1 + erf(z / sqrt 2)),
                tanh form:  y = 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))

Both kernels see the input as (M, N) rows (the GEMM's output, columns contiguous) in
[BLOCK_M, BLOCK_N] tiles; b is read once per tile. The forward reads x, writes y; the
backward recomputes z from x and b (cheaper than saving it) and writes dz, which is
both the GEMM's gradient and, summed over the rows, the bias gradient: each program
owns a fixed range of row tiles of one column block and writes one row of partials,
which :func:`vhist.kernels.common.partials_sum` adds in a fixed order.
tanh(u) is formed as 1 - 2 / (exp(2u) + 1), which saturates to +-1 at large |u| (no
overflow to NaN) and needs no libdevice call.
"""
import triton
import triton.language as tl

from .common import tanh

# The constants are written out in the kernels (sqrt(2/pi), 1/sqrt(2), 1/sqrt(2 pi), and
# the tanh form's 0.044715): module globals would have to be constexprs, which the
# interpreter does not multiply with tensors.


@triton.jit
def _tile(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    # int64 offsets: an MLP activation can hold more than 2**31 elements.
    return cols, rows.to(tl.int64)[:, None] * N + cols[None, :], mask


@triton.jit
def _gelu_and_grad(z, APPROXIMATE: tl.constexpr, GRAD: tl.constexpr):
    """(gelu(z), gelu'(z) when GRAD). erf: gelu' = Phi(z) + z phi(z); tanh (u = sqrt(2/pi)
    (z + 0.044715 z^3), t = tanh u): gelu' = 0.5 (1 + t) + 0.5 z (1 - t^2) du/dz."""
    if APPROXIMATE:
        t = tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        y = 0.5 * z * (1.0 + t)
        if GRAD:
            du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
            d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
        else:
            d = y
    else:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        y = z * cdf
        if GRAD:
            d = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
        else:
            d = y
    return y, d


# Forward: y = gelu(x + b), one read of x, one write of y.
@triton.jit
def _bias_gelu_fwd_kernel(
    X,     # (M, N) input (the GEMM's output), contiguous
    Bias,  # (N,) bias (HAS_BIAS)
    Y,     # (M, N) output, contiguous
    M, N,
    HAS_BIAS: tl.constexpr, APPROXIMATE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols, offs, mask = _tile(tl.program_id(0), tl.program_id(1), M, N, BLOCK_M, BLOCK_N)
    z = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        z += tl.load(Bias + cols, mask=cols < N, other=0.0).to(ACC)[None, :]
    y, _ = _gelu_and_grad(z, APPROXIMATE, False)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


# Backward: dz = dy * gelu'(x + b) and, with COMPUTE_DB, program (p, j) sums dz over its
# TILES_PER_PROGRAM row tiles of column block j into row p of PartDB (tile order).
@triton.jit
def _bias_gelu_bwd_kernel(
    DY,      # (M, N) gradient of Y, contiguous
    X,       # (M, N) forward input, contiguous
    Bias,    # (N,) bias (HAS_BIAS)
    DX,      # (M, N) gradient of X (and of z), contiguous
    PartDB,  # (P, N) partials of the bias gradient, ACC (COMPUTE_DB)
    M, N, TILES_PER_PROGRAM,
    HAS_BIAS: tl.constexpr, COMPUTE_DB: tl.constexpr, APPROXIMATE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid, pid_n = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        b = tl.load(Bias + cols, mask=cols < N, other=0.0).to(ACC)
    db = tl.zeros([BLOCK_N], dtype=ACC)
    for t in range(0, TILES_PER_PROGRAM):
        cols, offs, mask = _tile(pid * TILES_PER_PROGRAM + t, pid_n, M, N, BLOCK_M, BLOCK_N)
        z = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        if HAS_BIAS:
            z += b[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        _, d = _gelu_and_grad(z, APPROXIMATE, True)
        dz = dy * d
        tl.store(DX + offs, dz.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DB:
            db += tl.sum(tl.where(mask, dz, 0.0), axis=0)
    if COMPUTE_DB:
        tl.store(PartDB + pid.to(tl.int64) * N + cols, db, mask=cols < N)


bias_gelu_fwd = _bias_gelu_fwd_kernel
bias_gelu_bwd = _bias_gelu_bwd_kernel
