"""Layer Normalization kernels (Ba, Kiros & Hinton, 2016, "Layer Normalization", Eq. 4).

Every kernel sees the input as an (M, N) matrix: M rows (every position of every
sample), N the normalized width, columns contiguous, rows ``stride_xm`` apart. The
launcher makes that view of a tensor whose trailing ``normalized_shape`` dims are
contiguous (F.layer_norm), and of an NHWC (channels_last) tensor normalized over its
channels at each pixel (the ConvNeXt LayerNorm2d): there the rows are pixels, C apart.

A program owns a [BLOCK_M rows, BLOCK_N >= N columns] tile: whole rows, held in
registers, so each row is read once and written once (the "one pass" of the op: the
mean and then the centred second moment are formed from the registers, with no
E[x^2] - E[x]^2 cancellation). The structure follows Triton's layer-norm tutorial
(05-layer-norm.py), with two changes: rows stay in registers (N <= 16384), and the
weight/bias gradients are reduced deterministically, per-program partials of a fixed
row range merged in a fixed order by a second kernel, instead of the tutorial's locks
and atomics, whose summation order depends on the scheduling.
"""
import triton
import triton.language as tl


@triton.jit
def _rows(pid, M, N, stride_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices, column indices, int64 offsets and mask of tile ``pid``."""
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    # int64 offsets: an activation can hold more than 2**31 elements.
    offs = rows.to(tl.int64)[:, None] * stride_m + cols[None, :]
    return rows, cols, offs, mask


# Forward, one pass (Ba et al., 2016, Eq. 4): mu = mean_j x_j, sigma^2 = mean_j (x_j - mu)^2,
# y = (x - mu) / sqrt(sigma^2 + eps) * w + b. With a residual the normalized input is the
# sum s = x + r, rounded to the input dtype as torch's add would (so that the output is
# F.layer_norm(x + r) bit for bit in the rounding of s), and s is written as well (the
# pre-norm block's next residual stream). Mean and 1/sigma are saved in ACC.
@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) input, rows stride_xm apart, columns contiguous
    Res,  # (M, N) residual added to X (HAS_RESIDUAL), rows stride_rm apart
    W,  # (N,) weight (HAS_W)
    Bias,  # (N,) bias (HAS_B)
    Y,  # (M, N) normalized output, contiguous rows
    Sum,  # (M, N) X + Res, contiguous rows (HAS_RESIDUAL)
    Mean,  # (M,) row means, ACC
    Rstd,  # (M,) 1 / sqrt(var + eps), ACC
    M, N, stride_xm, stride_rm, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, cols, offs, mask = _rows(pid, M, N, stride_xm, BLOCK_M, BLOCK_N)
    x = tl.load(X + offs, mask=mask, other=0.0)
    out_offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if HAS_RESIDUAL:
        r_offs = rows.to(tl.int64)[:, None] * stride_rm + cols[None, :]
        r = tl.load(Res + r_offs, mask=mask, other=0.0)
        x = (x.to(ACC) + r.to(ACC)).to(Sum.dtype.element_ty)
        tl.store(Sum + out_offs, x, mask=mask)
    x = x.to(ACC)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    # sqrt_rn: the correctly rounded root (tl.sqrt of fp32 is an approximation); it has
    # no fp64 form, where tl.sqrt is the correctly rounded one.
    if ACC == tl.float64:
        rstd = 1.0 / tl.sqrt(var + eps)
    else:
        rstd = 1.0 / tl.sqrt_rn(var + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(ACC)[None, :]
    if HAS_B:
        y = y + tl.load(Bias + cols, mask=cols < N, other=0.0).to(ACC)[None, :]
    tl.store(Y + out_offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rows < M)
    tl.store(Rstd + rows, rstd, mask=rows < M)


# Backward (differentiating Eq. 4 with x_hat = (x - mu) rstd, g = dy * w):
#   dx = rstd * (g - mean_j(g) - x_hat * mean_j(g * x_hat)),
#   dw = sum_rows dy * x_hat,  db = sum_rows dy.
# Program p owns the TILES_PER_PROGRAM consecutive tiles from p * TILES_PER_PROGRAM: it
# writes dx for their rows and one row of dw / db partials, their sums over its rows in
# tile order. The partition is a function of (M, N) alone, so the partials, and the
# order the second kernel adds them in, do not depend on the device or a tuned config.
# With HAS_DRES the gradient reaching the residual sum s (the pre-norm block's stream)
# is added to dx: s = x + r feeds both the norm and the next block.
@triton.jit
def _layer_norm_bwd_dx_kernel(
    DY,  # (M, N) gradient of Y, rows stride_dym apart
    X,  # (M, N) the normalized input (X, or Sum with a residual), rows stride_xm apart
    W,  # (N,) weight (HAS_W)
    Mean,  # (M,) saved means
    Rstd,  # (M,) saved 1 / sigma
    DRes,  # (M, N) gradient reaching Sum (HAS_DRES), rows stride_dsm apart
    DX,  # (M, N) input gradient, contiguous rows
    PartDW,  # (P, N) per-program partials of dw, ACC (COMPUTE_DW)
    PartDB,  # (P, N) per-program partials of db, ACC (COMPUTE_DB)
    M, N, stride_dym, stride_xm, stride_dsm, TILES_PER_PROGRAM,
    HAS_W: tl.constexpr, HAS_DRES: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    if HAS_W:
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    db = tl.zeros([BLOCK_N], dtype=ACC)
    for t in range(0, TILES_PER_PROGRAM):
        tile = pid * TILES_PER_PROGRAM + t
        rows, cols, offs, mask = _rows(tile, M, N, stride_xm, BLOCK_M, BLOCK_N)
        row_ok = rows < M
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        dy_offs = rows.to(tl.int64)[:, None] * stride_dym + cols[None, :]
        dy = tl.load(DY + dy_offs, mask=mask, other=0.0).to(ACC)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        c1 = tl.sum(g * xhat, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
        if HAS_DRES:
            ds_offs = rows.to(tl.int64)[:, None] * stride_dsm + cols[None, :]
            dx += tl.load(DRes + ds_offs, mask=mask, other=0.0).to(ACC)
        out_offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(DX + out_offs, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += tl.sum(dy * xhat, axis=0)
        if COMPUTE_DB:
            db += tl.sum(tl.where(mask, dy, 0.0), axis=0)
    part = pid.to(tl.int64) * N + cols
    if COMPUTE_DW:
        tl.store(PartDW + part, dw, mask=cols < N)
    if COMPUTE_DB:
        tl.store(PartDB + part, db, mask=cols < N)


layer_norm_fwd = _layer_norm_fwd_kernel
layer_norm_bwd_dx = _layer_norm_bwd_dx_kernel
