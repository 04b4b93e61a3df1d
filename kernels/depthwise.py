"""Depthwise conv2d kernels (MobileNet: Howard et al., 2017; Sandler et al., 2018).

Depthwise conv is memory-bound (a 3x3 does ~4.5 FLOP per byte), so every kernel is laid
out for bandwidth: the channel axis is the vectorized, contiguous axis (NHWC), a
program owns a [BLOCK_P pixels, BLOCK_C channels] tile, and the KH x KW taps are
unrolled at compile time (KH, KW are constexpr: 3, 5 and 7 each get their own
specialization, other sizes work the same way). The taps of one tile read overlapping
windows of the same input rows: the tile's input footprint plus its halo is fetched
from DRAM once and re-read from L1/L2 for the remaining taps. Strides are arguments, so
NCHW inputs run through the same code (with strided, not vectorized, channel loads).

Output channel co reads input channel co // MULT (weight (C_in * MULT, 1, KH, KW)).
Activation codes: 0 none, 1 ReLU, 2 ReLU6.
"""
import triton
import triton.language as tl

from ._config import autotune
from .common import activate, activation_grad, chan_merge

# The pixel tiling of the forward is chosen by the launcher (the BN-statistics epilogue
# writes one partial per program, so the launcher must know the program count); only the
# channel tile and the warps are tuned, and not with STATS: the epilogue's tl.sum over a
# tile's pixels adds them in a tree that the layout (BLOCK_C, warps) sets, so a launch
# with STATS runs the first config only (kernels/_config.py: STATS_EPILOGUE_KERNELS).
# (32, 8) is last: the tile of the BN-statistics epilogue (kernels/_config.py).
FWD_CONFIGS = [triton.Config({"BLOCK_C": bc}, num_warps=w)
               for bc, w in ((32, 4), (64, 4), (16, 2), (128, 8), (64, 8), (32, 8))]
BWD_CONFIGS = [triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=w)
               for bp, bc, w in ((64, 32, 4), (32, 64, 4), (128, 16, 4), (64, 64, 8), (16, 128, 4))]
# Everything that changes the best tile: the batch, sizes, filter and conv geometry, and
# the epilogue (residual, activation, BN statistics).
FWD_KEY = ["N", "C_IN", "H", "W", "C_OUT", "OH", "OW", "KH", "KW", "conv_stride_h", "conv_stride_w", "dil_h", "dil_w",
           "HAS_BIAS", "HAS_RESIDUAL", "ACTIVATION", "STATS", "BLOCK_P", "TILES"]


@triton.jit
def _pixel_coords(p, HW, W):
    n = p // HW
    rem = p - n * HW
    h = rem // W
    return n, h, rem - h * W


# Forward: y[n, oh, ow, co] = b[co] + sum_{kh, kw} w[co, kh, kw] *
#   x[n, oh*conv_stride_h - pad_h + kh*dil_h, ow*conv_stride_w - pad_w + kw*dil_w, co // MULT]
# (zero outside the image),
# then "+ residual" and the activation in the epilogue (eval-mode fused op, BN folded
# into w and b). A program computes TILES consecutive pixel tiles. With STATS, the
# epilogue also reduces the stored output per channel for BatchNorm: each tile's exact
# (count, mean, M2) from the registers (two passes, never sum(x^2)), merged across the
# program's tiles with Chan et al.'s pairwise formula, one partial per program for the
# finalize kernel of kernels/batch_norm.py.
@triton.jit
def _depthwise_fwd_kernel(
    X,          # (N, C_IN, H, W) input, any strides (NHWC is the fast one)
    Wt,         # (C_OUT, 1, KH, KW) weight, any strides (the launcher passes it as (KH*KW, C_OUT))
    Bias,       # (C_OUT,) bias (unused unless HAS_BIAS)
    Res,        # (N, C_OUT, OH, OW) residual, strides of Y (unused unless HAS_RESIDUAL)
    Y,          # (N, C_OUT, OH, OW) output
    Z,          # (N, C_OUT, OH, OW) pre-activation, strides of Y (WRITE_PRE only)
    PartMean,   # (num_programs_p, C_OUT) per-program mean of Y (STATS only)
    PartM2,     # (num_programs_p, C_OUT) per-program sum of squared deviations
    PartCount,  # (num_programs_p,) pixels each program covered
    N, C_IN, H, W, C_OUT, OH, OW, MULT, TILES,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wh, stride_ww,
    stride_yn, stride_yc, stride_yh, stride_yw,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, STATS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    NEG_SLOPE: tl.constexpr, WRITE_PRE: tl.constexpr,
):
    pid_p = tl.program_id(0)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = co < C_OUT
    ci = co // MULT
    if HAS_BIAS:
        bias = tl.load(Bias + co, mask=c_mask, other=0.0).to(ACC)
    run_count = tl.zeros([1], dtype=ACC)
    run_mean = tl.zeros([BLOCK_C], dtype=ACC)
    run_m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for t in range(TILES):
        p = (pid_p * TILES + t) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < N * OH * OW
        n, oh, ow = _pixel_coords(p, OH * OW, OW)
        x_base = X + n.to(tl.int64)[:, None] * stride_xn + ci.to(tl.int64)[None, :] * stride_xc
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        for kh in tl.static_range(KH):
            ih = oh * conv_stride_h - pad_h + kh * dil_h
            h_ok = p_mask & (ih >= 0) & (ih < H)
            for kw in tl.static_range(KW):
                iw = ow * conv_stride_w - pad_w + kw * dil_w
                ok = h_ok & (iw >= 0) & (iw < W)
                w = tl.load(Wt + co * stride_wo + kh * stride_wh + kw * stride_ww, mask=c_mask, other=0.0).to(ACC)
                offs = ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
                x = tl.load(x_base + offs[:, None], mask=ok[:, None] & c_mask[None, :], other=0.0).to(ACC)
                acc += x * w[None, :]
        if HAS_BIAS:
            acc += bias[None, :]
        mask = p_mask[:, None] & c_mask[None, :]
        y_offs = (n.to(tl.int64) * stride_yn + oh.to(tl.int64) * stride_yh
                  + ow.to(tl.int64) * stride_yw)[:, None] + co.to(tl.int64)[None, :] * stride_yc
        if HAS_RESIDUAL:
            acc += tl.load(Res + y_offs, mask=mask, other=0.0).to(ACC)
        if WRITE_PRE:
            tl.store(Z + y_offs, acc.to(Z.dtype.element_ty), mask=mask)
        y = activate(acc, ACTIVATION, NEG_SLOPE).to(Y.dtype.element_ty)
        tl.store(Y + y_offs, y, mask=mask)
        if STATS:
            # Statistics of the value BatchNorm will normalize: the stored (rounded) output.
            tile_count = tl.sum(p_mask.to(ACC), axis=0)
            if tile_count > 0:
                ys = tl.where(mask, y.to(ACC), 0.0)
                tile_mean = tl.sum(ys, axis=0) / tile_count
                dev = tl.where(mask, ys - tile_mean[None, :], 0.0)
                tile_m2 = tl.sum(dev * dev, axis=0)
                run_count, run_mean, run_m2 = chan_merge(run_count, run_mean, run_m2, tile_count, tile_mean, tile_m2)
    if STATS:
        tl.store(PartMean + pid_p * C_OUT + co, run_mean, mask=c_mask)
        tl.store(PartM2 + pid_p * C_OUT + co, run_m2, mask=c_mask)
        if tl.program_id(1) == 0:
            tl.store(PartCount + pid_p + tl.arange(0, 1), run_count)


# Input gradient as a gather (the transposed conv, no atomics): for input pixel (ih, iw)
# and channel ci,  dx = sum_{m < MULT} sum_{kh, kw} w[co, kh, kw] * dy[n, oh, ow, co],
# co = ci*MULT + m, over the taps where oh = (ih + pad_h - kh*dil_h) / conv_stride_h (and likewise ow)
# is a whole number inside the output. dy is first multiplied by the activation's
# derivative (ACTIVATION) at Y when the forward had one: Y is the forward output for
# ReLU / ReLU6, the pre-activation (WRITE_PRE) for the others.
@triton.jit
def _depthwise_bwd_input_kernel(
    DY,   # (N, C_OUT, OH, OW) upstream gradient
    Y,    # (N, C_OUT, OH, OW) forward output or pre-activation, strides of DY (ACTIVATION != 0 only)
    Wt,   # (C_OUT, 1, KH, KW) weight, any strides (the launcher passes it as (KH*KW, C_OUT))
    DX,   # (N, C_IN, H, W) input gradient
    N, C_IN, H, W, C_OUT, OH, OW, MULT,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    stride_wo, stride_wh, stride_ww,
    stride_dxn, stride_dxc, stride_dxh, stride_dxw,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, ACTIVATION: tl.constexpr, NEG_SLOPE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ci = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < N * H * W
    c_mask = ci < C_IN
    n, ih, iw = _pixel_coords(p, H * W, W)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for m in range(MULT):
        co = ci * MULT + m
        dy_base = n.to(tl.int64)[:, None] * stride_dyn + co.to(tl.int64)[None, :] * stride_dyc
        for kh in tl.static_range(KH):
            th = ih + pad_h - kh * dil_h
            thc = tl.maximum(th, 0)
            oh = thc // conv_stride_h
            h_ok = p_mask & (th >= 0) & (oh * conv_stride_h == thc) & (oh < OH)
            for kw in tl.static_range(KW):
                tw = iw + pad_w - kw * dil_w
                twc = tl.maximum(tw, 0)
                ow = twc // conv_stride_w
                ok = h_ok & (tw >= 0) & (ow * conv_stride_w == twc) & (ow < OW)
                mask = ok[:, None] & c_mask[None, :]
                offs = dy_base + (oh.to(tl.int64) * stride_dyh + ow.to(tl.int64) * stride_dyw)[:, None]
                dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
                if ACTIVATION != 0:
                    y = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
                    dy = activation_grad(y, dy, ACTIVATION, NEG_SLOPE)
                w = tl.load(Wt + co * stride_wo + kh * stride_wh + kw * stride_ww, mask=c_mask, other=0.0).to(ACC)
                acc += dy * w[None, :]
    dx_offs = (n.to(tl.int64) * stride_dxn + ih.to(tl.int64) * stride_dxh + iw.to(tl.int64) * stride_dxw)[:, None] \
        + ci.to(tl.int64)[None, :] * stride_dxc
    tl.store(DX + dx_offs, acc.to(DX.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


# Elements of the weight-gradient kernel's per-tap accumulator (registers: 32 per thread
# at 4 warps, as many again for the x gather).
WGRAD_TILE = 4096


# Weight gradient, stage 1 of a deterministic two-stage reduction over the N*OH*OW
# output pixels: dw[tap, co] = sum_p dy[p, co] * x[tap(p), co // MULT] for every tap
# (kh, kw), and db[co] = sum_p dy[p, co]. Pixels outside, taps inside: a program walks
# its chunk of pixels in [BLOCK_P, BLOCK_C] tiles, reads each dy tile once and, for all
# KH*KW taps at once, the x values they meet as one [taps, BLOCK_P, BLOCK_C] gather (the
# tile's input footprint with its halo; neighbouring taps share it through L1), and
# accumulates the elementwise products per tap in registers. One tree sum over the
# pixels at the end; the partials go to Part[chunk, tap, co], channels contiguous. The
# tiling is fixed by the launcher from the shape (never tuned), so the summation order,
# and the bits of the result, depend only on the shape and the device.
@triton.jit
def _depthwise_bwd_weight_reduce_kernel(
    DY,    # (N, C_OUT, OH, OW) upstream gradient
    Out,   # (N, C_OUT, OH, OW) as the input-gradient kernel's Y (ACTIVATION != 0 only)
    X,     # (N, C_IN, H, W) forward input
    Part,  # (num_chunks, KH*KW + HAS_BIAS, C_OUT) partial sums, accumulation dtype
    N, C_IN, H, W, C_OUT, OH, OW, MULT, CHUNK,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, NEG_SLOPE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    TAPS: tl.constexpr = KH * KW + (1 if HAS_BIAS else 0)
    BLOCK_T: tl.constexpr = triton.next_power_of_2(KH * KW)
    co = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(1)
    c_mask = co < C_OUT
    ci = co // MULT
    tap = tl.arange(0, BLOCK_T)
    tap_ok = tap < KH * KW
    dh_tap = (tap // KW) * dil_h - pad_h
    dw_tap = (tap % KW) * dil_w - pad_w
    total = N * OH * OW
    p_start = chunk * CHUNK
    p_end = tl.minimum(p_start + CHUNK, total)
    acc = tl.zeros([BLOCK_T, BLOCK_P, BLOCK_C], dtype=ACC)
    acc_b = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    x_c = (ci.to(tl.int64) * stride_xc)[None, None, :]
    for p0 in range(p_start, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < p_end
        n, oh, ow = _pixel_coords(p, OH * OW, OW)
        mask = p_mask[:, None] & c_mask[None, :]
        y_offs = (n.to(tl.int64) * stride_dyn + oh.to(tl.int64) * stride_dyh
                  + ow.to(tl.int64) * stride_dyw)[:, None] + co.to(tl.int64)[None, :] * stride_dyc
        dy = tl.load(DY + y_offs, mask=mask, other=0.0).to(ACC)
        if ACTIVATION != 0:
            out = tl.load(Out + y_offs, mask=mask, other=0.0).to(ACC)
            dy = activation_grad(out, dy, ACTIVATION, NEG_SLOPE)
        if HAS_BIAS:
            acc_b += dy
        ih = (oh * conv_stride_h)[None, :] + dh_tap[:, None]  # [BLOCK_T, BLOCK_P]
        iw = (ow * conv_stride_w)[None, :] + dw_tap[:, None]
        ok = tap_ok[:, None] & p_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_offs = (n.to(tl.int64) * stride_xn)[None, :] + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
        x = tl.load(X + (x_offs[:, :, None] + x_c), mask=ok[:, :, None] & c_mask[None, None, :], other=0.0)
        acc += x.to(ACC) * dy[None, :, :]
    part_base = Part + chunk.to(tl.int64) * TAPS * C_OUT
    tl.store(part_base + tap[:, None] * C_OUT + co[None, :], tl.sum(acc, axis=1),
             mask=tap_ok[:, None] & c_mask[None, :])
    if HAS_BIAS:
        tl.store(part_base + (KH * KW) * C_OUT + co, tl.sum(acc_b, axis=0), mask=c_mask)


def weight_grad_tiling(kh: int, kw: int, channels_last: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) of the weight-gradient reduce kernel: a fixed
    [next_pow2(KH*KW), BLOCK_P, BLOCK_C] accumulator of WGRAD_TILE elements, wide along
    the contiguous axis (channels for NHWC, pixels for NCHW). Fixed by the shape alone
    (never autotuned), so that the in-chunk summation order is too."""
    return (*_tap_tile(triton.next_power_of_2(kh * kw), channels_last), 4)


def _tap_tile(taps: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of a [taps, BLOCK_P, BLOCK_C] accumulator of WGRAD_TILE elements
    (``taps`` a power of two), wide along the contiguous axis."""
    block_c = min(32 if channels_last else 4, max(1, WGRAD_TILE // taps))
    return max(1, WGRAD_TILE // (taps * block_c)), block_c


@triton.jit
def _sum_chunks(Part, j, j_mask, J, k_start, k_end, ACC: tl.constexpr, BLOCK_J: tl.constexpr,
                BLOCK_K: tl.constexpr):
    # Sums rows k_start..k_end-1 of Part (rows of J values) at the columns j, BLOCK_K
    # rows per step in row order: the order is fixed by the bounds, so the bits are too.
    acc = tl.zeros([BLOCK_J], dtype=ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = (k < k_end)[:, None] & j_mask[None, :]
        acc += tl.sum(tl.load(Part + k.to(tl.int64)[:, None] * J + j[None, :], mask=mask, other=0.0), axis=0)
    return acc


# Weight gradient, merge level (as kernels/batch_norm.py's _bn_bwd_merge_kernel): program
# (block of flat (tap, channel) indices, group g) sums the partials of chunks
# [g * GROUP, (g + 1) * GROUP) in chunk order into Group[g]. The launcher repeats the
# level until at most GROUP partials remain (vhist.ops.heuristics.merge_levels), so no
# program walks more than GROUP partials in sequence however many chunks the first
# stage wrote; the tree is a function of the chunk count alone.
@triton.jit
def _depthwise_bwd_weight_merge_kernel(
    Part,   # (num_chunks, KH*KW + HAS_BIAS, C_out) partial sums from the first stage or a level
    Group,  # (cdiv(num_chunks, GROUP), KH*KW + HAS_BIAS, C_out) group sums
    J, num_chunks, GROUP,
    ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    g = tl.program_id(1)
    j_mask = j < J
    k_start = g * GROUP
    acc = _sum_chunks(Part, j, j_mask, J, k_start, tl.minimum(k_start + GROUP, num_chunks), ACC, BLOCK_J, BLOCK_K)
    tl.store(Group + g.to(tl.int64) * J + j, acc, mask=j_mask)


# Weight gradient, stage 2: sums the (at most a group of) partials of every (tap,
# channel) in chunk order (BLOCK_K chunks per step), so the result is bitwise
# reproducible, and writes dw (and db) in the parameter dtype.
@triton.jit
def _depthwise_bwd_weight_finalize_kernel(
    Part,  # (num_chunks, KH*KW + HAS_BIAS, C_out) from the reduce stage or the last merge level
    DW,    # (C_out, 1, KH, KW) weight gradient
    DB,    # (C_out,) bias gradient (unused unless HAS_BIAS)
    C_out, num_chunks,
    stride_wc, stride_wh, stride_ww,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    TAPS: tl.constexpr = KH * KW + (1 if HAS_BIAS else 0)
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)  # flat (tap, channel) index
    j_mask = j < TAPS * C_out
    acc = _sum_chunks(Part, j, j_mask, TAPS * C_out, 0, num_chunks, ACC, BLOCK_J, BLOCK_K)
    tap = j // C_out
    co = j - tap * C_out
    is_w = j_mask & (tap < KH * KW)
    tl.store(DW + co * stride_wc + (tap // KW) * stride_wh + (tap % KW) * stride_ww,
             acc.to(DW.dtype.element_ty), mask=is_w)
    if HAS_BIAS:
        tl.store(DB + co, acc.to(DB.dtype.element_ty), mask=j_mask & (tap == KH * KW))


# Input and weight gradients in one pass over dy (the plain op's backward, and the fused
# op's after dz): a program walks its chunk of *input* pixels, the zero padding included
# (the GH x GW gather grid), in [BLOCK_P, BLOCK_C] tiles (channels ci) and gathers, for
# every (multiplier m, tap) pair j at once, the dy value that pair meets as one
# [BLOCK_J, BLOCK_P, BLOCK_C] load: co = ci*MULT + m at oh = (ih + pad_h - kh*dil_h) /
# conv_stride_h where that division is exact and in range (likewise ow), zero elsewhere.
# The same gathered values give both gradients:
#   dx[i, ci]      = sum_j w[co_j, tap_j] * dy[o_j(i), co_j]      (the transposed conv)
#   dw[co_j, tap_j] += x[i, ci] * dy[o_j(i), co_j]                (summed over the chunk)
# since, for a fixed tap, o -> i = o*s - pad + tap*d is a bijection between the output
# pixels and the grid pixels whose output exists. The sum over j thus ranges over exactly
# the (output, tap) pairs of PyTorch's conv backward (an unfold, then a GEMM): dy * 0 is
# formed for the taps in the padding (x = 0 there; NaN for a non-finite dy, as PyTorch
# gives) and x * dy only for outputs that exist (never an Inf x times a masked 0). The
# padding ring costs (GH*GW)/(H*W) - 1 more pixel tiles (a 3x3 at 56x56: 7%, at 7x7:
# 65%): dy halo reads from L1/L2, no x or dx traffic. So dy
# is read once from DRAM (the taps re-read its halo through L1/L2), x once, dx written
# once: the 3 passes of the README's minimum, where the two kernels above make 4. dy is
# multiplied by the activation's derivative (ACTIVATION, at Y as in the input-gradient
# kernel, gathered the same way). The bias gradient, a sum of dy over the *output* pixels, cannot be read
# off the input-pixel gather; with HAS_BIAS the program also sums its share of output
# pixels (a second read of dy, through DYB). Partials go to Part[chunk, tap, co] as for
# the weight-gradient reduce kernel above, and _depthwise_bwd_weight_finalize_kernel
# sums them in chunk order: chunking fixed by the shape, so the bits are too.
@triton.jit
def _depthwise_bwd_kernel(
    DY,    # (N, C_OUT, OH, OW) upstream gradient
    Y,     # (N, C_OUT, OH, OW) as the input-gradient kernel's Y (ACTIVATION != 0 only)
    DYB,   # DY again: the bias pass's read (HAS_BIAS only)
    X,     # (N, C_IN, H, W) forward input
    Wt,    # (C_OUT, 1, KH, KW) weight, any strides (the launcher passes it as (KH*KW, C_OUT))
    DX,    # (N, C_IN, H, W) input gradient
    Part,  # (num_chunks, KH*KW + HAS_BIAS, C_OUT) weight/bias partial sums, accumulation dtype
    N, C_IN, H, W, C_OUT, OH, OW, MULT, CHUNK, OUT_CHUNK,
    GH, GW,  # the gather grid: the input padded by (pad_h, pad_w) before, to every row/column a tap reaches
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wh, stride_ww,
    stride_dxn, stride_dxc, stride_dxh, stride_dxw,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, UNIT_MULT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, NEG_SLOPE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    TAPS: tl.constexpr = KH * KW + (1 if HAS_BIAS else 0)
    ci = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(1)
    c_mask = ci < C_IN
    j = tl.arange(0, BLOCK_J)  # (m, tap) pairs, m major
    j_ok = j < MULT * KH * KW
    tap = j % (KH * KW)
    kh = tap // KW
    kw = tap - kh * KW
    if UNIT_MULT:  # m = 0: a constant, so the compiler keeps the channel rows' alignment
        m = tl.zeros_like(j)
    else:
        m = j // (KH * KW)
    co = ci[None, :] * MULT + m[:, None]  # [BLOCK_J, BLOCK_C]
    jc_mask = j_ok[:, None] & c_mask[None, :]
    w = tl.load(Wt + co * stride_wo + (kh * stride_wh + kw * stride_ww)[:, None], mask=jc_mask, other=0.0).to(ACC)
    dy_c = (co.to(tl.int64) * stride_dyc)[:, None, :]
    total = N * GH * GW
    p_start = chunk * CHUNK
    p_end = tl.minimum(p_start + CHUNK, total)
    acc = tl.zeros([BLOCK_J, BLOCK_P, BLOCK_C], dtype=ACC)
    for p0 in range(p_start, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < p_end
        n, ih, iw = _pixel_coords(p, GH * GW, GW)
        ih -= pad_h
        iw -= pad_w
        inside = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        th = ih[None, :] + pad_h - (kh * dil_h)[:, None]  # [BLOCK_J, BLOCK_P]
        thc = tl.maximum(th, 0)
        oh = thc // conv_stride_h
        tw = iw[None, :] + pad_w - (kw * dil_w)[:, None]
        twc = tl.maximum(tw, 0)
        ow = twc // conv_stride_w
        ok = (j_ok[:, None] & p_mask[None, :] & (th >= 0) & (oh * conv_stride_h == thc) & (oh < OH)
              & (tw >= 0) & (ow * conv_stride_w == twc) & (ow < OW))
        offs = ((n.to(tl.int64) * stride_dyn)[None, :] + oh.to(tl.int64) * stride_dyh
                + ow.to(tl.int64) * stride_dyw)[:, :, None] + dy_c
        mask = ok[:, :, None] & c_mask[None, None, :]
        dz = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        if ACTIVATION != 0:
            y = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
            dz = activation_grad(y, dz, ACTIVATION, NEG_SLOPE)
        pc_mask = inside[:, None] & c_mask[None, :]
        dx_offs = (n.to(tl.int64) * stride_dxn + ih.to(tl.int64) * stride_dxh
                   + iw.to(tl.int64) * stride_dxw)[:, None] + ci.to(tl.int64)[None, :] * stride_dxc
        tl.store(DX + dx_offs, tl.sum(dz * w[:, None, :], axis=0).to(DX.dtype.element_ty), mask=pc_mask)
        x_offs = (n.to(tl.int64) * stride_xn + ih.to(tl.int64) * stride_xh
                  + iw.to(tl.int64) * stride_xw)[:, None] + ci.to(tl.int64)[None, :] * stride_xc
        x = tl.load(X + x_offs, mask=pc_mask, other=0.0).to(ACC)
        # Only the (output, tap) pairs that exist: an x (Inf) never meets a masked dz.
        acc += dz * tl.where(mask, x[None, :, :], 0.0)
    part_base = Part + chunk.to(tl.int64) * TAPS * C_OUT
    tl.store(part_base + tap[:, None] * C_OUT + co, tl.sum(acc, axis=1), mask=jc_mask)
    if HAS_BIAS:
        # db[co] over this chunk's share of the output pixels, one multiplier at a time.
        q_start = chunk * OUT_CHUNK
        q_end = tl.minimum(q_start + OUT_CHUNK, N * OH * OW)
        for m in range(MULT):
            cm = ci * MULT + m
            acc_b = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
            for q0 in range(q_start, q_end, BLOCK_P):
                q = q0 + tl.arange(0, BLOCK_P)
                q_mask = q < q_end
                n, oh, ow = _pixel_coords(q, OH * OW, OW)
                offs = (n.to(tl.int64) * stride_dyn + oh.to(tl.int64) * stride_dyh
                        + ow.to(tl.int64) * stride_dyw)[:, None] + cm.to(tl.int64)[None, :] * stride_dyc
                qc_mask = q_mask[:, None] & c_mask[None, :]
                dz = tl.load(DYB + offs, mask=qc_mask, other=0.0).to(ACC)
                if ACTIVATION != 0:
                    y = tl.load(Y + offs, mask=qc_mask, other=0.0).to(ACC)
                    dz = activation_grad(y, dz, ACTIVATION, NEG_SLOPE)
                acc_b += dz
            tl.store(part_base + (KH * KW) * C_OUT + cm, tl.sum(acc_b, axis=0), mask=c_mask)


def input_weight_grad_tiling(kh: int, kw: int, multiplier: int, channels_last: bool) -> tuple[int, int, int, int]:
    """(BLOCK_J, BLOCK_P, BLOCK_C, num_warps) of :func:`_depthwise_bwd_kernel`: the
    (multiplier, tap) axis padded to a power of two, and a [BLOCK_J, BLOCK_P, BLOCK_C]
    accumulator of WGRAD_TILE elements, wide along the contiguous axis (channels for
    NHWC, pixels for NCHW), as :func:`weight_grad_tiling`. Fixed by the shape alone.

    8 warps: the kernel holds the accumulator, the gathered dy and their 64-bit offsets
    at once; at 4 warps (32 accumulator elements per thread) it sat at 128 registers and
    triton 3.6's ptxas spilled two values to an 8-byte stack frame at MobileNetV2's
    32x112x112 and 144x56x56 stride-2 layers (static, sm_90 compile); at 8 warps it takes
    101-109 registers and no local memory under triton 3.6 and 3.9, the same 16 warps per
    SM."""
    block_j = triton.next_power_of_2(multiplier * kh * kw)
    return (block_j, *_tap_tile(block_j, channels_last), 8)


depthwise_fwd = autotune(FWD_CONFIGS, FWD_KEY)(_depthwise_fwd_kernel)
BWD_INPUT_KEY = ["N", "C_IN", "C_OUT", "H", "W", "OH", "OW", "KH", "KW", "conv_stride_h", "conv_stride_w",
                 "dil_h", "dil_w", "ACTIVATION"]
depthwise_bwd_input = autotune(BWD_CONFIGS, BWD_INPUT_KEY)(_depthwise_bwd_input_kernel)
# The weight gradient's tiling is fixed by the shape (weight_grad_tiling), not tuned.
depthwise_bwd_weight_reduce = _depthwise_bwd_weight_reduce_kernel
depthwise_bwd_weight_merge = _depthwise_bwd_weight_merge_kernel
depthwise_bwd_weight_finalize = _depthwise_bwd_weight_finalize_kernel
# Its tiling is fixed by the shape too (input_weight_grad_tiling).
depthwise_bwd = _depthwise_bwd_kernel
