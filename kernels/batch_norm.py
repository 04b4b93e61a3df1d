"""Batch Normalization kernels (Ioffe & Szegedy, 2015).

Every kernel sees the activation as a 3-D view (N, C, S) with arbitrary strides: S is
the flattened spatial extent. The launcher collapses N into S when the two are
contiguous together (channels_last, or a 2-D (N, C) input), so that one loop covers
both memory formats. The reduction space N*S is split into chunks; a chunk is a range
of rows n and a segment [s0, s0 + SEG_LEN) of each row. Programs form a grid of
(channel blocks, chunks), and every reduction writes per-chunk partials that a merge
tree (channel blocks x groups of at most BN_MERGE_GROUP partials per level, then a small
finalize) combines in an order fixed by the partial count. The two kernels that reduce
the activation itself (statistics, gradient sums) run one tile per memory format, never
tuned, so the bits of the statistics and the gradient sums depend on the shape, dtype,
memory format and chunking (vhist.ops.heuristics.bn_chunks), never on an autotune pick.
"""
import triton
import triton.language as tl

from ._config import autotune
from .common import activate, activation_grad, chan_merge


def _configs(block_c_block_s_warps):
    return [triton.Config({"BLOCK_C": bc, "BLOCK_S": bs}, num_warps=w) for bc, bs, w in block_c_block_s_warps]


# Channels contiguous in memory (channels_last, (N, C)): wide along C, short along S.
CHANNELS_CONTIGUOUS_CONFIGS = _configs([(64, 32, 4), (32, 64, 4), (128, 16, 4), (64, 64, 8), (16, 128, 4)])
# Spatial positions contiguous (NCHW): one or a few channels, long along S.
SPATIAL_CONTIGUOUS_CONFIGS = _configs([(2, 512, 4), (1, 1024, 4), (4, 256, 4), (1, 2048, 8), (8, 128, 4)])
# The reductions of the activation (statistics, gradient sums) take the first config of
# their family and nothing else: BLOCK_S sets how many rows a tile's two-pass (mean, M2)
# or sum covers before the running merge, and BLOCK_C and num_warps set the register
# layout, hence the tree in which tl.sum adds a tile's rows on a GPU; any of them tuned
# would make the bits depend on the pick. The elementwise kernels (apply, dx) tune
# freely: no config changes what they compute per element.
CHANNELS_CONTIGUOUS_REDUCE_CONFIGS = CHANNELS_CONTIGUOUS_CONFIGS[:1]
SPATIAL_CONTIGUOUS_REDUCE_CONFIGS = SPATIAL_CONTIGUOUS_CONFIGS[:1]
TUNE_KEY = ["C", "S", "N"]


@triton.jit
def _chunk_bounds(chunk, N, S, N_PER_CHUNK, SEG_LEN, SEGS_PER_ROW):
    n_start = (chunk // SEGS_PER_ROW) * N_PER_CHUNK
    n_end = tl.minimum(n_start + N_PER_CHUNK, N)
    s_start = (chunk % SEGS_PER_ROW) * SEG_LEN
    s_end = tl.minimum(s_start + SEG_LEN, S)
    return n_start, n_end, s_start, s_end


@triton.jit
def _tile_offsets(n, s_block, c, stride_xn, stride_xc, stride_xs):
    # int64 offsets: an activation can hold more than 2**31 elements.
    return (tl.cast(n, tl.int64) * stride_xn + s_block.to(tl.int64)[:, None] * stride_xs
            + c.to(tl.int64)[None, :] * stride_xc)


# Algorithm 1, statistics. Each program reduces its chunk tile by tile: a tile's exact
# mean and sum of squared deviations (M2) come from the registers in two passes, and
# are merged into the running (count, mean, M2) with Chan et al.'s pairwise formula
# (kernels/common.py: chan_merge). Nothing forms E[x^2] - E[x]^2, so |mean| >> std does
# not cancel.
@triton.jit
def _bn_fwd_stats_kernel(
    X,          # (N, C, S) activation, any strides
    PartMean,   # (NUM_CHUNKS, C) per-chunk mean, accumulation dtype
    PartM2,     # (NUM_CHUNKS, C) per-chunk sum of squared deviations
    PartCount,  # (NUM_CHUNKS,) elements per channel in each chunk
    N, C, S,
    stride_xn, stride_xc, stride_xs,
    N_PER_CHUNK, SEG_LEN, SEGS_PER_ROW,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_c = tl.program_id(0)
    chunk = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n_start, n_end, s_start, s_end = _chunk_bounds(chunk, N, S, N_PER_CHUNK, SEG_LEN, SEGS_PER_ROW)

    count = tl.zeros([1], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for n in range(n_start, n_end):
        for s0 in range(s_start, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_mask = s < s_end
            mask = s_mask[:, None] & c_mask[None, :]
            x = tl.load(X + _tile_offsets(n, s, c, stride_xn, stride_xc, stride_xs), mask=mask, other=0.0).to(ACC)
            tile_count = tl.sum(s_mask.to(ACC), axis=0)
            tile_mean = tl.sum(x, axis=0) / tile_count
            dev = tl.where(mask, x - tile_mean[None, :], 0.0)
            tile_m2 = tl.sum(dev * dev, axis=0)
            count, mean, m2 = chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)

    tl.store(PartMean + chunk * C + c, mean, mask=c_mask)
    tl.store(PartM2 + chunk * C + c, m2, mask=c_mask)
    if pid_c == 0:
        tl.store(PartCount + chunk + tl.arange(0, 1), count)


@triton.jit
def _merge_stats(PartMean, PartM2, PartCount, c, c_mask, C, k_start, k_end,
                 ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # Merges partials k_start..k_end-1 of each channel, BLOCK_K at a time in partial
    # order: the K-way form of Chan's formula inside a block, the pairwise form across
    # blocks. The order is fixed by the bounds, so the bits are too.
    count = tl.zeros([1], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_end
        mask = k_mask[:, None] & c_mask[None, :]
        offs = k.to(tl.int64)[:, None] * C + c[None, :]
        part_count = tl.load(PartCount + k, mask=k_mask, other=0.0)
        part_mean = tl.load(PartMean + offs, mask=mask, other=0.0)
        part_m2 = tl.load(PartM2 + offs, mask=mask, other=0.0)
        block_count = tl.sum(part_count, axis=0)
        block_mean = tl.sum(part_count[:, None] * part_mean, axis=0) / block_count
        dev = tl.where(mask, part_mean - block_mean[None, :], 0.0)
        block_m2 = tl.sum(part_m2 + part_count[:, None] * dev * dev, axis=0)
        count, mean, m2 = chan_merge(count, mean, m2, block_count, block_mean, block_m2)
    return count, mean, m2


# First level of the two-level statistics merge: program (channel block, group g)
# merges partials [g * GROUP, (g + 1) * GROUP) into one (count, mean, M2) per channel,
# so that no program walks more than GROUP partials in sequence however many the conv
# epilogue or the stats kernel wrote. The launcher repeats this level until at most
# GROUP partials remain; the finalize kernel merges those.
@triton.jit
def _bn_fwd_merge_kernel(
    PartMean, PartM2, PartCount,     # (NUM_CHUNKS, C), (NUM_CHUNKS, C), (NUM_CHUNKS,) partials
    GroupMean, GroupM2, GroupCount,  # (cdiv(NUM_CHUNKS, GROUP), C) x 2, (cdiv(NUM_CHUNKS, GROUP),) merged groups
    C, NUM_CHUNKS, GROUP,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_c = tl.program_id(0)
    g = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    k_start = g * GROUP
    k_end = tl.minimum(k_start + GROUP, NUM_CHUNKS)
    count, mean, m2 = _merge_stats(PartMean, PartM2, PartCount, c, c_mask, C, k_start, k_end, ACC, BLOCK_C, BLOCK_K)
    tl.store(GroupMean + g * C + c, mean, mask=c_mask)
    tl.store(GroupM2 + g * C + c, m2, mask=c_mask)
    if pid_c == 0:
        tl.store(GroupCount + g + tl.arange(0, 1), count)


# Merges the (at most a group of) per-chunk (count, mean, M2) of each channel in chunk
# order (_merge_stats). Writes mean and 1/sqrt(var + eps) (biased var, Algorithm 1) and
# updates the running statistics with the unbiased variance, as PyTorch does.
@triton.jit
def _bn_fwd_finalize_kernel(
    PartMean, PartM2, PartCount,  # per-chunk partials from _bn_fwd_stats_kernel or _bn_fwd_merge_kernel
    Mean,         # (C,) batch mean, accumulation dtype
    Rstd,         # (C,) 1 / sqrt(biased batch var + eps)
    RunningMean,  # (C,) updated in place when UPDATE_RUNNING
    RunningVar,   # (C,) updated in place with the unbiased variance
    C, NUM_CHUNKS, momentum, eps,
    UPDATE_RUNNING: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    count, mean, m2 = _merge_stats(PartMean, PartM2, PartCount, c, c_mask, C, 0, NUM_CHUNKS, ACC, BLOCK_C, BLOCK_K)

    var = m2 / count
    tl.store(Mean + c, mean, mask=c_mask)
    tl.store(Rstd + c, 1.0 / tl.sqrt(var + eps), mask=c_mask)
    if UPDATE_RUNNING:
        running_mean = tl.load(RunningMean + c, mask=c_mask).to(ACC)
        running_var = tl.load(RunningVar + c, mask=c_mask).to(ACC)
        unbiased_var = m2 / (count - 1.0)
        running_mean = (1.0 - momentum) * running_mean + momentum * mean
        running_var = (1.0 - momentum) * running_var + momentum * unbiased_var
        tl.store(RunningMean + c, running_mean.to(RunningMean.dtype.element_ty), mask=c_mask)
        tl.store(RunningVar + c, running_var.to(RunningVar.dtype.element_ty), mask=c_mask)


# ACTIVATION codes (vhist.ops.common.Activation), shared with the conv kernels: the
# fused conv + BN + activation ops run their elementwise epilogue and their backward
# through the kernels below.


@triton.jit
def _masked_grad(DY, X, Res, offs, mask, scale, shift, ACTIVATION: tl.constexpr, NEG_SLOPE: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr):
    # dz = dy * act'(z), z = x * scale + shift (+ residual) recomputed from the saved
    # pre-normalization x and the statistics, as the forward apply computed it.
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    if ACTIVATION != 0:
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        z = x * scale[None, :] + shift[None, :]
        if HAS_RESIDUAL:
            z += tl.load(Res + offs, mask=mask, other=0.0).to(ACC)
        dy = activation_grad(z, dy, ACTIVATION, NEG_SLOPE)
    return dy


@triton.jit
def _load_scale_shift(Mean, Rstd, W, Bias, c, c_mask, eps,
                      RSTD_FROM_VAR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      ACC: tl.constexpr):
    # y = (x - mean) * rstd * w + b  =  x * scale + shift
    mean = tl.load(Mean + c, mask=c_mask, other=0.0).to(ACC)
    rstd = tl.load(Rstd + c, mask=c_mask, other=1.0).to(ACC)
    if RSTD_FROM_VAR:
        rstd = 1.0 / tl.sqrt(rstd + eps)
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(W + c, mask=c_mask, other=0.0).to(ACC)
    shift = -mean * scale
    if HAS_B:
        shift += tl.load(Bias + c, mask=c_mask, other=0.0).to(ACC)
    return mean, rstd, scale, shift


# Normalize, scale and shift: y = w * (x - mean) * rstd + b. Training passes the batch
# statistics (Algorithm 1); eval passes the running mean and variance (Algorithm 2,
# RSTD_FROM_VAR), which makes eval BatchNorm this single elementwise kernel.
# Fusion options (defaults leave plain BN unchanged): y = act(y + residual) with
# HAS_RESIDUAL and ACTIVATION (kernels.common's codes, NEG_SLOPE for leaky relu), the
# epilogue of conv + BN. With X_ACTIVATION the normalized value is act(x) (X holds the
# pre-activation of a conv -> activation -> BN, whose statistics are those of act(x)).
@triton.jit
def _bn_fwd_apply_kernel(
    X,     # (N, C, S) input
    Y,     # (N, C, S) output, same strides as X
    Mean,  # (C,) batch or running mean
    Rstd,  # (C,) 1/sqrt(var + eps), or the running variance when RSTD_FROM_VAR
    W, Bias,  # (C,) affine weight and bias (unused when HAS_W / HAS_B are False)
    Res,   # (N, C, S) residual, same strides as X (unused unless HAS_RESIDUAL)
    N, C, S,
    stride_xn, stride_xc, stride_xs,
    N_PER_CHUNK, SEG_LEN, SEGS_PER_ROW, eps,
    RSTD_FROM_VAR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ACTIVATION: tl.constexpr = 0, HAS_RESIDUAL: tl.constexpr = False,
    NEG_SLOPE: tl.constexpr = 0.01, X_ACTIVATION: tl.constexpr = 0, X_NEG_SLOPE: tl.constexpr = 0.01,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n_start, n_end, s_start, s_end = _chunk_bounds(tl.program_id(1), N, S, N_PER_CHUNK, SEG_LEN, SEGS_PER_ROW)
    _, _, scale, shift = _load_scale_shift(Mean, Rstd, W, Bias, c, c_mask, eps, RSTD_FROM_VAR, HAS_W, HAS_B, ACC)
    for n in range(n_start, n_end):
        for s0 in range(s_start, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (s < s_end)[:, None] & c_mask[None, :]
            offs = _tile_offsets(n, s, c, stride_xn, stride_xc, stride_xs)
            x = activate(tl.load(X + offs, mask=mask, other=0.0).to(ACC), X_ACTIVATION, X_NEG_SLOPE)
            y = x * scale[None, :] + shift[None, :]
            if HAS_RESIDUAL:
                y += tl.load(Res + offs, mask=mask, other=0.0).to(ACC)
            y = activate(y, ACTIVATION, NEG_SLOPE)
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


# Backward, stage 1: per-chunk partial sums of dy and dy * x_hat for each channel,
# x_hat = (x - mean) * rstd from the statistics saved by the forward (never recomputed).
# These two sums give dbeta = sum(dy), dgamma = sum(dy * x_hat), and the two mean
# terms of the training input gradient. With ACTIVATION (and HAS_RESIDUAL), dy is first
# masked by the derivative of act(w * x_hat + b + residual), recomputed from x and the
# statistics: the sums are then those of dz, the gradient at the BN output. WRITE_DZ
# also stores dz (the residual's gradient), so that the dx stage reads dz instead of
# recomputing the mask from dy, x and the residual again. With X_ACTIVATION, x_hat is that
# of act(x) (see the apply kernel).
@triton.jit
def _bn_bwd_reduce_kernel(
    DY,     # (N, C, S) upstream gradient, same strides as X
    X,      # (N, C, S) forward input
    Mean,   # (C,) saved mean (or running mean in eval)
    Rstd,   # (C,) saved rstd (or running variance when RSTD_FROM_VAR)
    W, Bias,   # (C,) affine parameters (read only with ACTIVATION, to recompute the mask)
    Res,    # (N, C, S) forward residual, same strides as X (unused unless HAS_RESIDUAL)
    PartSumDy,      # (NUM_CHUNKS, C)
    PartSumDyXhat,  # (NUM_CHUNKS, C)
    DZ,     # (N, C, S) the masked gradient dz, same strides as X (written only with WRITE_DZ)
    N, C, S,
    stride_xn, stride_xc, stride_xs,
    N_PER_CHUNK, SEG_LEN, SEGS_PER_ROW, eps,
    RSTD_FROM_VAR: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ACTIVATION: tl.constexpr = 0, HAS_RESIDUAL: tl.constexpr = False,
    HAS_W: tl.constexpr = False, HAS_B: tl.constexpr = False, WRITE_DZ: tl.constexpr = False,
    NEG_SLOPE: tl.constexpr = 0.01, X_ACTIVATION: tl.constexpr = 0, X_NEG_SLOPE: tl.constexpr = 0.01,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    chunk = tl.program_id(1)
    n_start, n_end, s_start, s_end = _chunk_bounds(chunk, N, S, N_PER_CHUNK, SEG_LEN, SEGS_PER_ROW)
    mean, rstd, scale, shift = _load_scale_shift(Mean, Rstd, W, Bias, c, c_mask, eps, RSTD_FROM_VAR, HAS_W, HAS_B, ACC)
    sum_dy = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dy_xhat = tl.zeros([BLOCK_C], dtype=ACC)
    for n in range(n_start, n_end):
        for s0 in range(s_start, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (s < s_end)[:, None] & c_mask[None, :]
            offs = _tile_offsets(n, s, c, stride_xn, stride_xc, stride_xs)
            x = activate(tl.load(X + offs, mask=mask, other=0.0).to(ACC), X_ACTIVATION, X_NEG_SLOPE)
            dy = _masked_grad(DY, X, Res, offs, mask, scale, shift, ACTIVATION, NEG_SLOPE, HAS_RESIDUAL, ACC)
            if WRITE_DZ:
                tl.store(DZ + offs, dy.to(DZ.dtype.element_ty), mask=mask)
            # No mask on x_hat: dy is 0 outside the tile, so are its products. (The
            # tl.where cost triton 3.6's ptxas the register it then kept in a stack
            # frame at BLOCK_C=64 with 16 elements per thread.)
            x_hat = (x - mean[None, :]) * rstd[None, :]
            sum_dy += tl.sum(dy, axis=0)
            sum_dy_xhat += tl.sum(dy * x_hat, axis=0)
    tl.store(PartSumDy + chunk * C + c, sum_dy, mask=c_mask)
    tl.store(PartSumDyXhat + chunk * C + c, sum_dy_xhat, mask=c_mask)


@triton.jit
def _sum_partials(PartSumDy, PartSumDyXhat, c, c_mask, C, k_start, k_end,
                  ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # Sums partials k_start..k_end-1 of each channel, BLOCK_K at a time in partial order.
    sum_dy = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dy_xhat = tl.zeros([BLOCK_C], dtype=ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = (k < k_end)[:, None] & c_mask[None, :]
        offs = k.to(tl.int64)[:, None] * C + c[None, :]
        sum_dy += tl.sum(tl.load(PartSumDy + offs, mask=mask, other=0.0), axis=0)
        sum_dy_xhat += tl.sum(tl.load(PartSumDyXhat + offs, mask=mask, other=0.0), axis=0)
    return sum_dy, sum_dy_xhat


# Backward, first merge level (as _bn_fwd_merge_kernel): program (channel block, g)
# sums partials [g * GROUP, (g + 1) * GROUP) of Σdy and Σdy·x̂.
@triton.jit
def _bn_bwd_merge_kernel(
    PartSumDy, PartSumDyXhat,    # (NUM_CHUNKS, C) partial sums
    GroupSumDy, GroupSumDyXhat,  # (cdiv(NUM_CHUNKS, GROUP), C) group sums
    C, NUM_CHUNKS, GROUP,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    g = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    k_start = g * GROUP
    k_end = tl.minimum(k_start + GROUP, NUM_CHUNKS)
    sum_dy, sum_dy_xhat = _sum_partials(PartSumDy, PartSumDyXhat, c, c_mask, C, k_start, k_end, ACC, BLOCK_C,
                                        BLOCK_K)
    tl.store(GroupSumDy + g * C + c, sum_dy, mask=c_mask)
    tl.store(GroupSumDyXhat + g * C + c, sum_dy_xhat, mask=c_mask)


# Backward, stage 2: sums the (at most a group of) partials over chunks in chunk order.
# dgamma and dbeta are these sums (paper, backward of Algorithm 1); they are written in
# the parameter dtype.
@triton.jit
def _bn_bwd_finalize_kernel(
    PartSumDy, PartSumDyXhat,  # (NUM_CHUNKS, C) from _bn_bwd_reduce_kernel or _bn_bwd_merge_kernel
    SumDy, SumDyXhat,          # (C,) accumulation dtype
    DW, DB,                    # (C,) gradients of weight and bias
    C, NUM_CHUNKS,
    WRITE_DW: tl.constexpr, WRITE_DB: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    sum_dy, sum_dy_xhat = _sum_partials(PartSumDy, PartSumDyXhat, c, c_mask, C, 0, NUM_CHUNKS, ACC, BLOCK_C,
                                        BLOCK_K)
    tl.store(SumDy + c, sum_dy, mask=c_mask)
    tl.store(SumDyXhat + c, sum_dy_xhat, mask=c_mask)
    if WRITE_DW:
        tl.store(DW + c, sum_dy_xhat.to(DW.dtype.element_ty), mask=c_mask)
    if WRITE_DB:
        tl.store(DB + c, sum_dy.to(DB.dtype.element_ty), mask=c_mask)


# Backward, stage 3, the input gradient. Training (batch statistics, m = N*S values):
#   dx = w * rstd * (dy - sum(dy)/m - x_hat * sum(dy * x_hat)/m)
# Eval (running statistics are constants): dx = w * rstd * dy.
# With ACTIVATION / HAS_RESIDUAL, dy is replaced by the masked dz (as in the reduce
# stage) and WRITE_DRES also stores dz, the gradient of the residual. With X_ACTIVATION
# (conv -> activation -> BN) the normalized value is act(x) and the gradient written is
# that at the pre-activation x: dx * act'(x), act recomputed from x (nothing else saved).
@triton.jit
def _bn_bwd_dx_kernel(
    DY, X,       # (N, C, S) upstream gradient and forward input, same strides
    DX,          # (N, C, S) input gradient, same strides
    Mean, Rstd,  # (C,) as in _bn_bwd_reduce_kernel
    W,           # (C,) affine weight (unused when HAS_W is False)
    SumDy, SumDyXhat,  # (C,) from _bn_bwd_finalize_kernel (unused in eval)
    Bias,        # (C,) affine bias (read only with ACTIVATION and HAS_B)
    Res,         # (N, C, S) forward residual, same strides (unused unless HAS_RESIDUAL)
    DRes,        # (N, C, S) residual gradient, same strides (unused unless WRITE_DRES)
    N, C, S,
    stride_xn, stride_xc, stride_xs,
    N_PER_CHUNK, SEG_LEN, SEGS_PER_ROW, eps, inv_count,
    TRAINING: tl.constexpr, RSTD_FROM_VAR: tl.constexpr, HAS_W: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ACTIVATION: tl.constexpr = 0, HAS_RESIDUAL: tl.constexpr = False,
    HAS_B: tl.constexpr = False, WRITE_DRES: tl.constexpr = False,
    NEG_SLOPE: tl.constexpr = 0.01, X_ACTIVATION: tl.constexpr = 0, X_NEG_SLOPE: tl.constexpr = 0.01,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n_start, n_end, s_start, s_end = _chunk_bounds(tl.program_id(1), N, S, N_PER_CHUNK, SEG_LEN, SEGS_PER_ROW)
    mean, rstd, scale, shift = _load_scale_shift(Mean, Rstd, W, Bias, c, c_mask, eps, RSTD_FROM_VAR, HAS_W, HAS_B, ACC)
    if TRAINING:
        mean_dy = tl.load(SumDy + c, mask=c_mask, other=0.0) * inv_count
        mean_dy_xhat = tl.load(SumDyXhat + c, mask=c_mask, other=0.0) * inv_count
    for n in range(n_start, n_end):
        for s0 in range(s_start, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (s < s_end)[:, None] & c_mask[None, :]
            offs = _tile_offsets(n, s, c, stride_xn, stride_xc, stride_xs)
            dy = _masked_grad(DY, X, Res, offs, mask, scale, shift, ACTIVATION, NEG_SLOPE, HAS_RESIDUAL, ACC)
            if WRITE_DRES:
                tl.store(DRes + offs, dy.to(DRes.dtype.element_ty), mask=mask)
            if TRAINING or X_ACTIVATION != 0:
                x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
            if TRAINING:
                x_hat = (activate(x, X_ACTIVATION, X_NEG_SLOPE) - mean[None, :]) * rstd[None, :]
                dy = dy - mean_dy[None, :] - x_hat * mean_dy_xhat[None, :]
            dx = dy * scale[None, :]
            if X_ACTIVATION != 0:
                dx = activation_grad(x, dx, X_ACTIVATION, X_NEG_SLOPE)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _tuned(kernel, channels_contiguous_configs=CHANNELS_CONTIGUOUS_CONFIGS,
           spatial_contiguous_configs=SPATIAL_CONTIGUOUS_CONFIGS):
    """The kernel autotuned once per memory-format family (their best tiles differ)."""
    return (autotune(channels_contiguous_configs, TUNE_KEY)(kernel),
            autotune(spatial_contiguous_configs, TUNE_KEY)(kernel))


bn_fwd_stats = _tuned(_bn_fwd_stats_kernel, CHANNELS_CONTIGUOUS_REDUCE_CONFIGS, SPATIAL_CONTIGUOUS_REDUCE_CONFIGS)
bn_fwd_apply = _tuned(_bn_fwd_apply_kernel)
bn_bwd_reduce = _tuned(_bn_bwd_reduce_kernel, CHANNELS_CONTIGUOUS_REDUCE_CONFIGS, SPATIAL_CONTIGUOUS_REDUCE_CONFIGS)
bn_bwd_dx = _tuned(_bn_bwd_dx_kernel)
bn_fwd_finalize = _bn_fwd_finalize_kernel
bn_bwd_finalize = _bn_bwd_finalize_kernel
bn_fwd_merge = _bn_fwd_merge_kernel
bn_bwd_merge = _bn_bwd_merge_kernel
