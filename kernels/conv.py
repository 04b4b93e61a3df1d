"""Dense 2-D convolution as implicit GEMM (forward, dgrad, wgrad) with fused epilogues.

Tensors are addressed through their four strides (N, C, H, W); the launchers hand in
channels_last (NHWC) activations and weights, so the reduction dimension of every GEMM
(input channels, output channels, or positions) is the contiguous one. Groups are a
grid dimension: group g convolves input channels [g*CG_IN, (g+1)*CG_IN) with output
channels [g*CG_OUT, (g+1)*CG_OUT). Padding is given as (top, left) plus the output
size, which also covers the asymmetric padding of 'same' with an even kernel.

fp64 (used by gradchecks) multiplies tiles with an elementwise FMA reduction instead
of tl.dot: the tensor-core dot has no fp64 form on every GPU Triton targets. It is the
only path that does so; fp32/fp16/bf16 always use tl.dot with fp32 accumulation.
"""
import triton
import triton.language as tl

from ._config import autotune
from .common import activate, activation_grad, mma


def _configs(rows, stages=3):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=stages)
            for m, n, k, w in rows]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps). The first row is the one the interpreter uses.
# No 256-wide tile: with the flat main loop the compile report (static, sm_90 compile,
# bf16, ResNet-50 3x3 layers) still puts 128x256x32, 256x128x32 and 128x256x64 s4 at the
# 255-register cap in the forward (with stack stores), one 8-warp block per SM, and at
# ResNet-50's 14x14 and 7x7 layers (batch 128) they give 1.5-3 programs per SM.
GEMM_CONFIGS = _configs([
    (64, 64, 32, 4), (128, 128, 32, 8), (128, 64, 32, 4), (64, 128, 32, 4),
    (128, 128, 64, 8), (32, 64, 32, 4), (64, 32, 32, 4),
]) + _configs([(128, 128, 64, 8)], stages=4)
# fp64: the FMA path holds a BLOCK_M x BLOCK_K x BLOCK_N product in registers.
FP64_CONFIGS = _configs([(32, 32, 8, 4), (16, 32, 16, 4), (32, 16, 16, 4)], stages=2)
# Stem convs (C_in <= 4, no groups, e.g. RGB 7x7 stride 2, AlexNet's 11x11 stride 4):
# the forward launcher zero-pads the input and weight channels to STEM_CHANNELS once per
# call, so that every activation row is 16-byte aligned (cp.async / 16-byte loads) and a
# tap is one K block of 16; the dgrad keeps the real channels as a narrow N tile.
STEM_CHANNELS = 16
STEM_FWD_CONFIGS = _configs([(128, 64, 16, 4), (64, 64, 16, 4), (128, 128, 16, 8), (64, 32, 16, 4)])
STEM_DGRAD_CONFIGS = _configs([(128, 16, 32, 4), (64, 16, 32, 4), (128, 16, 64, 4), (256, 16, 32, 8)])
WGRAD_REDUCE_BLOCK = 1024

FWD_KEY = ["N", "H", "W", "OH", "OW", "CG_IN", "CG_OUT", "KH", "KW", "conv_stride_h", "conv_stride_w", "ACTIVATION"]


@triton.jit
def _prologue(x, Mean, Rstd, Weight, Bias, channel, valid, channel_ok, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              PRE_ACTIVATION: tl.constexpr, PRE_NEG_SLOPE: tl.constexpr, ACC: tl.constexpr):
    # The producing layer's BatchNorm and activation applied to a loaded input tile, so
    # that its normalized output is never written (the mainloop fusion of CUTLASS's
    # examples 25/26): act(x * scale + shift) per input channel, scale = gamma * rstd and
    # shift = beta - mean * scale from the producer's statistics (gamma 1, beta 0 when
    # absent); positions outside the image (padding) stay 0, as they are 0 in the
    # activation the unfused conv would read. channel / channel_ok broadcast along the
    # tile's channel axis (either axis of the tile).
    scale = tl.load(Rstd + channel, mask=channel_ok, other=0.0).to(ACC)
    if HAS_W:
        scale = scale * tl.load(Weight + channel, mask=channel_ok, other=0.0).to(ACC)
    shift = -tl.load(Mean + channel, mask=channel_ok, other=0.0).to(ACC) * scale
    if HAS_B:
        shift += tl.load(Bias + channel, mask=channel_ok, other=0.0).to(ACC)
    y = activate(x.to(ACC) * scale + shift, PRE_ACTIVATION, PRE_NEG_SLOPE)
    return tl.where(valid, y, 0.0).to(x.dtype)


@triton.jit
def _aligned(x, ALIGN: tl.constexpr):
    # ``x``, which the launcher checked is a multiple of ALIGN, written so that Triton's
    # alignment analysis sees it: the runtime specialization only marks integers
    # divisible by 16, so a channel count or row stride of 24 (MobileNetV2's 24-channel
    # layers: 48-byte rows, 16-byte aligned) left the channel loads 2 bytes wide, too
    # narrow for cp.async, and the K loop unpipelined. CH_ALIGN (elements, 16 bytes at
    # most) is the launcher's :func:`vhist.ops.conv.channel_align`; 1 adds nothing.
    return x // ALIGN * ALIGN


# Forward, implicit GEMM (Chetlur et al., "cuDNN", 2014, section 3.1):
#   Y[m, co] = sum_{kh, kw, ci} X[n, oh*s - p + kh*d, ow*s - p + kw*d, ci] * W[co, ci, kh, kw]
# with m = (n, oh, ow) and K walked as one flat loop over (tap, channel block), so that
# the software pipeline runs across taps (one fill and drain per program, not one per
# tap); the padding masks are computed per step from the tap, the padded taps loading
# zero. With PROLOGUE the input is the raw output of a conv whose BatchNorm + activation
# (its statistics and affine parameters, PRE_ACTIVATION) is applied here to each loaded
# tile (_prologue).
# Epilogue on the fp32 accumulator: bias, then (STATS) the tile's BatchNorm partials
# (count, mean, M2) per channel in the layout bn_fwd_finalize merges with Chan's formula,
# then residual and activation, then one store. With STATS the activation is that of a
# conv -> activation -> BN (ACTIVATION 0 for conv -> BN): the statistics are those of the
# activated value, and Y receives the pre-activation, which the BN kernels read (their
# X_ACTIVATION) (with WRITE_PRE also a store of the
# pre-activation to Z, what the backward of an activation not invertible from its
# output reads).
@triton.jit
def _conv2d_fwd_kernel(
    X,          # (N, C_in, H, W) input, any strides (channels_last in practice)
    Wt,         # (C_out, CG_IN, KH, KW) weight, any strides
    Bias,       # (C_out,) bias (unused unless HAS_BIAS)
    Res,        # (N, C_out, OH, OW) residual, Y's strides (unused unless HAS_RESIDUAL)
    Y,          # (N, C_out, OH, OW) output
    Z,          # (N, C_out, OH, OW) pre-activation, Y's strides (WRITE_PRE)
    PartMean,   # (num_m_tiles, C_out) per-tile channel mean of the accumulator (STATS)
    PartM2,     # (num_m_tiles, C_out) per-tile sum of squared deviations (STATS)
    PartCount,  # (num_m_tiles,) valid rows per tile (STATS)
    PreMean,    # (C_in,) prologue: the producer's batch mean, accumulation dtype (PROLOGUE)
    PreRstd,    # (C_in,) prologue: its 1/sqrt(var + eps)
    PreW,       # (C_in,) prologue: its BN weight (PRE_HAS_W)
    PreB,       # (C_in,) prologue: its BN bias (PRE_HAS_B)
    N, H, W, OH, OW, CG_IN, CG_OUT, KH, KW,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wi, stride_wh, stride_ww,
    stride_yn, stride_yc, stride_yh, stride_yw,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, STATS: tl.constexpr,
    PROLOGUE: tl.constexpr, PRE_HAS_W: tl.constexpr, PRE_HAS_B: tl.constexpr, PRE_ACTIVATION: tl.constexpr,
    NEG_SLOPE: tl.constexpr, PRE_NEG_SLOPE: tl.constexpr, WRITE_PRE: tl.constexpr,
    FMA: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CH_ALIGN: tl.constexpr = 1,
):
    if CH_ALIGN > 1:  # see _aligned: the input's rows and the weight's K axis
        CG_IN = _aligned(CG_IN, CH_ALIGN)
        stride_xn = _aligned(stride_xn, CH_ALIGN)
        stride_xh = _aligned(stride_xh, CH_ALIGN)
        stride_xw = _aligned(stride_xw, CH_ALIGN)
        stride_wo = _aligned(stride_wo, CH_ALIGN)
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < N * OH * OW
    n = m // (OH * OW)
    oh = (m // OW) % OH
    ow = m % OW
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_mask = co < CG_OUT
    co_g = g * CG_OUT + co
    ck = tl.arange(0, BLOCK_K)
    x_base = X + n.to(tl.int64) * stride_xn + (g * CG_IN).to(tl.int64) * stride_xc
    w_base = Wt + co_g.to(tl.int64) * stride_wo

    # One loop over (tap, channel block): the pipeliner overlaps the loads of step i+1
    # with the MMA of step i across tap boundaries, one fill and one drain per program.
    ih0 = oh * conv_stride_h - pad_h
    iw0 = ow * conv_stride_w - pad_w
    x_row0 = x_base + ih0.to(tl.int64) * stride_xh + iw0.to(tl.int64) * stride_xw
    num_cb = tl.cdiv(CG_IN, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for step in range(0, KH * KW * num_cb):
        tap = step // num_cb
        c = (step - tap * num_cb) * BLOCK_K + ck
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_row = x_row0 + ((kh * dil_h).to(tl.int64) * stride_xh + (kw * dil_w).to(tl.int64) * stride_xw)
        c_ok = c < CG_IN
        a = tl.load(x_row[:, None] + c[None, :].to(tl.int64) * stride_xc,
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        if PROLOGUE:
            a = _prologue(a, PreMean, PreRstd, PreW, PreB, (g * CG_IN + c)[None, :], row_ok[:, None] & c_ok[None, :],
                          c_ok[None, :], PRE_HAS_W, PRE_HAS_B, PRE_ACTIVATION, PRE_NEG_SLOPE, ACC)
        b = tl.load(w_base[None, :] + (kh * stride_wh + kw * stride_ww) + c[:, None] * stride_wi,
                    mask=c_ok[:, None] & co_mask[None, :], other=0.0)
        acc = mma(acc, a, b, FMA, INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(Bias + co_g, mask=co_mask, other=0.0).to(ACC)[None, :]
    if STATS:
        # Exact two-pass (mean, M2) of this tile's rows from the registers.
        valid = m_mask[:, None] & co_mask[None, :]
        count = tl.sum(m_mask.to(ACC), axis=0)
        act = activate(acc, ACTIVATION, NEG_SLOPE)
        mean = tl.sum(tl.where(valid, act, 0.0), axis=0) / count
        dev = tl.where(valid, act - mean[None, :], 0.0)
        part = pid_m.to(tl.int64) * (CG_OUT * tl.num_programs(2)) + co_g
        tl.store(PartMean + part, mean, mask=co_mask)
        tl.store(PartM2 + part, tl.sum(dev * dev, axis=0), mask=co_mask)
        if (pid_n == 0) & (g == 0):
            tl.store(PartCount + pid_m + tl.arange(0, 1), count + tl.zeros([1], dtype=ACC))
    y_offs = (n.to(tl.int64) * stride_yn + oh.to(tl.int64) * stride_yh + ow.to(tl.int64) * stride_yw)[:, None] \
        + co_g.to(tl.int64)[None, :] * stride_yc
    out_mask = m_mask[:, None] & co_mask[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(Res + y_offs, mask=out_mask, other=0.0).to(ACC)
    if WRITE_PRE:
        tl.store(Z + y_offs, acc.to(Z.dtype.element_ty), mask=out_mask)
    if not STATS:
        acc = activate(acc, ACTIVATION, NEG_SLOPE)
    tl.store(Y + y_offs, acc.to(Y.dtype.element_ty), mask=out_mask)


# Data gradient, the transposed implicit GEMM (M = N*H*W, N = CG_IN, K = CG_OUT*KH*KW):
#   dX[n, h, w, ci] = sum_{kh, kw, co} dY[n, oh, ow, co] * W[co, ci, kh, kw],
#   oh = (h + p - kh*d) / s where that division is exact and in range (else no term).
# Strided convs are split by output phase (h mod s, w mod s), one phase per program
# (grid axis 2 = group * s_h * s_w + phase): whether a tap's division is exact depends
# only on the phase, so a program skips the taps that contribute nothing to its rows
# instead of multiplying masked zeros (a s_h*s_w-fold saving on stride-2 layers); the
# reaching taps and the channel blocks form one flat, software-pipelined loop.
# With ACTIVATION (plain conv2d with an activation epilogue) dY is multiplied on the fly
# by the activation's derivative at the saved Y: the forward output for ReLU / ReLU6
# (their derivative reads the same off it), the pre-activation for the others.
@triton.jit
def _conv2d_bwd_dgrad_kernel(
    DY,   # (N, C_out, OH, OW) upstream gradient
    Y,    # (N, C_out, OH, OW) forward output or pre-activation, DY's strides (unused unless ACTIVATION)
    Wt,   # (C_out, CG_IN, KH, KW) weight
    DX,   # (N, C_in, H, W) input gradient
    N, H, W, OH, OW, CG_IN, CG_OUT, KH, KW,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    stride_wo, stride_wi, stride_wh, stride_ww,
    stride_dxn, stride_dxc, stride_dxh, stride_dxw,
    ACTIVATION: tl.constexpr, FMA: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NEG_SLOPE: tl.constexpr,
    CH_ALIGN: tl.constexpr = 1,
):
    if CH_ALIGN > 1:  # see _aligned: dY's rows (the K axis)
        CG_OUT = _aligned(CG_OUT, CH_ALIGN)
        stride_dyn = _aligned(stride_dyn, CH_ALIGN)
        stride_dyh = _aligned(stride_dyh, CH_ALIGN)
        stride_dyw = _aligned(stride_dyw, CH_ALIGN)
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    phases = conv_stride_h * conv_stride_w
    g, phase = tl.program_id(2) // phases, tl.program_id(2) % phases
    ph, pw = phase // conv_stride_w, phase % conv_stride_w
    # Rows of this phase: h = hh * conv_stride_h + ph, w = ww * conv_stride_w + pw.
    hh_n, ww_n = tl.cdiv(H, conv_stride_h), tl.cdiv(W, conv_stride_w)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = m // (hh_n * ww_n)
    hh = (m // ww_n) % hh_n
    ww = m % ww_n
    h = hh * conv_stride_h + ph
    w = ww * conv_stride_w + pw
    m_mask = (m < N * hh_n * ww_n) & (h < H) & (w < W)
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_mask = ci < CG_IN
    ck = tl.arange(0, BLOCK_K)
    dy_base = n.to(tl.int64) * stride_dyn + (g * CG_OUT).to(tl.int64) * stride_dyc
    w_base = Wt + (g * CG_OUT).to(tl.int64) * stride_wo + ci.to(tl.int64) * stride_wi

    # The taps that reach this phase: kh*dil_h = ph + pad_h (mod s_h), an arithmetic
    # progression kh0, kh0 + step_h, ... with step_h = s_h / gcd(s_h, dil_h) (likewise kw);
    # found by scalar scans for the first solutions (KH, KW and the strides are small).
    step_h, step_w = conv_stride_h, conv_stride_w
    for t in range(1, conv_stride_h):
        if ((t * dil_h) % conv_stride_h == 0) & (step_h == conv_stride_h):
            step_h = t
    for t in range(1, conv_stride_w):
        if ((t * dil_w) % conv_stride_w == 0) & (step_w == conv_stride_w):
            step_w = t
    kh0, kw0 = KH, KW
    for k in range(0, KH):
        if ((ph + pad_h - k * dil_h) % conv_stride_h == 0) & (kh0 == KH):
            kh0 = k
    for k in range(0, KW):
        if ((pw + pad_w - k * dil_w) % conv_stride_w == 0) & (kw0 == KW):
            kw0 = k
    num_kh = tl.cdiv(KH - kh0, step_h)
    num_kw = tl.cdiv(KW - kw0, step_w)
    num_cb = tl.cdiv(CG_OUT, BLOCK_K)
    # For a reaching tap, oh = hh + (ph + pad_h - kh*dil_h) / s_h exactly (likewise ow).
    dy_row0 = dy_base + hh.to(tl.int64) * stride_dyh + ww.to(tl.int64) * stride_dyw
    w_base = w_base + kh0 * stride_wh + kw0 * stride_ww

    # One loop over (reaching tap, channel block), pipelined across taps (see forward).
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for step in range(0, num_kh * num_kw * num_cb):
        tap = step // num_cb
        c = (step - tap * num_cb) * BLOCK_K + ck
        th = tap // num_kw
        tw = tap - th * num_kw
        dh = (ph + pad_h - (kh0 + th * step_h) * dil_h) // conv_stride_h
        dw = (pw + pad_w - (kw0 + tw * step_w) * dil_w) // conv_stride_w
        oh = hh + dh
        ow = ww + dw
        row_ok = m_mask & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        c_ok = c < CG_OUT
        offs = (dy_row0 + (dh.to(tl.int64) * stride_dyh + dw.to(tl.int64) * stride_dyw))[:, None] \
            + c[None, :].to(tl.int64) * stride_dyc
        a_mask = row_ok[:, None] & c_ok[None, :]
        a = tl.load(DY + offs, mask=a_mask, other=0.0)
        if ACTIVATION != 0:
            y = tl.load(Y + offs, mask=a_mask, other=0.0)
            a = activation_grad(y.to(ACC), a.to(ACC), ACTIVATION, NEG_SLOPE).to(a.dtype)
        b = tl.load(w_base[None, :] + (th * step_h * stride_wh + tw * step_w * stride_ww)
                    + c[:, None].to(tl.int64) * stride_wo, mask=c_ok[:, None] & ci_mask[None, :], other=0.0)
        acc = mma(acc, a, b, FMA, INPUT_PRECISION)

    dx_offs = (n.to(tl.int64) * stride_dxn + h.to(tl.int64) * stride_dxh + w.to(tl.int64) * stride_dxw)[:, None] \
        + (g * CG_IN + ci).to(tl.int64)[None, :] * stride_dxc
    tl.store(DX + dx_offs, acc.to(DX.dtype.element_ty), mask=m_mask[:, None] & ci_mask[None, :])


# Weight gradient, a GEMM whose reduction runs over the N*OH*OW output positions:
#   dW[co, ci, kh, kw] = sum_{n, oh, ow} dY[n, oh, ow, co] * X[n, oh*s - p + kh*d, ow*s - p + kw*d, ci]
# Split-K without atomics: split k of SPLIT reduces positions [k*P, (k+1)*P) and writes
# its own fp32 partial PartDW[k, co, kh, kw, ci]; _conv2d_bwd_wgrad_reduce_kernel sums
# the splits in order, so the result is bitwise reproducible. The programs of tap (0, 0)
# and the first channel block also reduce dbias = sum dY (HAS_DBIAS). With PROLOGUE, X is
# the producing layer's raw conv output and its BN + activation is recomputed on each
# loaded tile, as the forward applied it.
@triton.jit
def _conv2d_bwd_wgrad_kernel(
    DY,      # (N, C_out, OH, OW) upstream gradient
    Y,       # (N, C_out, OH, OW) as the dgrad kernel's Y (unused unless ACTIVATION)
    X,       # (N, C_in, H, W) forward input
    PartDW,  # (SPLIT, C_out, KH, KW, CG_IN) partial weight gradients, contiguous
    PartDB,  # (SPLIT, C_out) partial bias gradients (unused unless HAS_DBIAS)
    PreMean,   # (C_in,) prologue of X: the producer's batch mean, accumulation dtype (PROLOGUE)
    PreRstd,   # (C_in,) prologue: its 1/sqrt(var + eps)
    PreW,      # (C_in,) prologue: its BN weight (PRE_HAS_W)
    PreB,      # (C_in,) prologue: its BN bias (PRE_HAS_B)
    N, H, W, OH, OW, CG_IN, CG_OUT, KH, KW,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw, stride_xn, stride_xc, stride_xh, stride_xw,
    POS_PER_SPLIT, GROUPS,
    HAS_DBIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    PROLOGUE: tl.constexpr, PRE_HAS_W: tl.constexpr, PRE_HAS_B: tl.constexpr, PRE_ACTIVATION: tl.constexpr,
    NEG_SLOPE: tl.constexpr, PRE_NEG_SLOPE: tl.constexpr,
    FMA: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CH_ALIGN: tl.constexpr = 1,
):
    if CH_ALIGN > 1:  # see _aligned: dY's and X's rows (M and N)
        CG_OUT = _aligned(CG_OUT, CH_ALIGN)
        CG_IN = _aligned(CG_IN, CH_ALIGN)
        stride_dyn = _aligned(stride_dyn, CH_ALIGN)
        stride_dyh = _aligned(stride_dyh, CH_ALIGN)
        stride_dyw = _aligned(stride_dyw, CH_ALIGN)
        stride_xn = _aligned(stride_xn, CH_ALIGN)
        stride_xh = _aligned(stride_xh, CH_ALIGN)
        stride_xw = _aligned(stride_xw, CH_ALIGN)
    num_ci_blocks = tl.cdiv(CG_IN, BLOCK_N)
    pid_co, pid_ci = tl.program_id(0) // num_ci_blocks, tl.program_id(0) % num_ci_blocks
    tap = tl.program_id(1)
    kh, kw = tap // KW, tap % KW
    split, g = tl.program_id(2) // GROUPS, tl.program_id(2) % GROUPS
    co = pid_co * BLOCK_M + tl.arange(0, BLOCK_M)
    co_mask = co < CG_OUT
    co_g = g * CG_OUT + co
    ci = pid_ci * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_mask = ci < CG_IN
    ci_g = g * CG_IN + ci
    pk = tl.arange(0, BLOCK_K)
    total = N * OH * OW
    p_start = split * POS_PER_SPLIT
    p_end = tl.minimum(p_start + POS_PER_SPLIT, total)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    db = tl.zeros([BLOCK_M], dtype=ACC)
    for p0 in range(p_start, p_end, BLOCK_K):
        p = p0 + pk
        p_ok = p < p_end
        n = p // (OH * OW)
        oh = (p // OW) % OH
        ow = p % OW
        dy_offs = (n.to(tl.int64) * stride_dyn + oh.to(tl.int64) * stride_dyh + ow.to(tl.int64) * stride_dyw)[None, :] \
            + co_g.to(tl.int64)[:, None] * stride_dyc
        a_mask = co_mask[:, None] & p_ok[None, :]
        a = tl.load(DY + dy_offs, mask=a_mask, other=0.0)
        if ACTIVATION != 0:
            y = tl.load(Y + dy_offs, mask=a_mask, other=0.0)
            a = activation_grad(y.to(ACC), a.to(ACC), ACTIVATION, NEG_SLOPE).to(a.dtype)
        if HAS_DBIAS:
            db += tl.sum(a.to(ACC), axis=1)
        ih = oh * conv_stride_h - pad_h + kh * dil_h
        iw = ow * conv_stride_w - pad_w + kw * dil_w
        x_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_offs = (n.to(tl.int64) * stride_xn + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw)[:, None] \
            + ci_g.to(tl.int64)[None, :] * stride_xc
        b = tl.load(X + x_offs, mask=x_ok[:, None] & ci_mask[None, :], other=0.0)
        if PROLOGUE:  # the forward's input recomputed from the raw X, as the forward's prologue did
            b = _prologue(b, PreMean, PreRstd, PreW, PreB, ci_g[None, :], x_ok[:, None] & ci_mask[None, :],
                          ci_mask[None, :], PRE_HAS_W, PRE_HAS_B, PRE_ACTIVATION, PRE_NEG_SLOPE, ACC)
        acc = mma(acc, a, b, FMA, INPUT_PRECISION)

    c_out = CG_OUT * GROUPS
    part = split.to(tl.int64) * c_out * KH * KW * CG_IN \
        + ((co_g.to(tl.int64) * KH + kh) * KW + kw)[:, None] * CG_IN + ci[None, :]
    tl.store(PartDW + part, acc, mask=co_mask[:, None] & ci_mask[None, :])
    if HAS_DBIAS:
        if (tap == 0) & (pid_ci == 0):
            tl.store(PartDB + split * c_out + co_g, db, mask=co_mask)


# Second stage of the split-K weight gradient: out[i] = sum_k Part[k, i] for k in
# order (fixed, so deterministic), cast to the parameter dtype.
# Stem input and weight: (N, C, H, W) with C <= STEM_CHANNELS, any strides, copied to
# channels_last (N, STEM_CHANNELS, H, W) with zero channels from C on, so that every row
# the stem GEMM loads is 16-byte aligned. One (rows x channels) tile per program: rows are
# the flattened (n, h, w), the channels the contiguous axis of the output.
@triton.jit
def _conv2d_fwd_pad_kernel(
    X,  # (N, C, H, W) input or weight, any strides
    Y,  # (N, C_PAD, H, W) channels_last output
    ROWS, C, H, W,
    stride_xn, stride_xc, stride_xh, stride_xw,
    C_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, C_PAD)
    r_ok = r < ROWS
    n = r // (H * W)
    h = (r // W) % H
    w = r % W
    x_row = n.to(tl.int64) * stride_xn + h.to(tl.int64) * stride_xh + w.to(tl.int64) * stride_xw
    x = tl.load(X + x_row[:, None] + c[None, :].to(tl.int64) * stride_xc, mask=r_ok[:, None] & (c[None, :] < C),
                other=0.0)
    tl.store(Y + r.to(tl.int64)[:, None] * C_PAD + c[None, :], x, mask=r_ok[:, None])


@triton.jit
def _conv2d_bwd_wgrad_reduce_kernel(
    Part,  # (SPLIT, NUMEL) partials, accumulation dtype
    Out,   # (NUMEL,) result, contiguous
    NUMEL, SPLIT,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < NUMEL
    total = tl.zeros([BLOCK], dtype=ACC)
    for k in range(SPLIT):
        total += tl.load(Part + k * NUMEL + i, mask=mask, other=0.0)
    tl.store(Out + i, total.to(Out.dtype.element_ty), mask=mask)


def _tuned(kernel, key):
    """(tl.dot variant, fp64 FMA variant), each autotuned on its own configs."""
    return autotune(GEMM_CONFIGS, key)(kernel), autotune(FP64_CONFIGS, key)(kernel)


# stride_xn / stride_dxn (C_in*H*W in either dense layout) with H, W and CG_IN fix the
# group count, which the forward and dgrad kernels take from their grid.
FWD_TUNE_KEY = FWD_KEY + ["HAS_BIAS", "STATS", "HAS_RESIDUAL", "PROLOGUE", "stride_xn"]
DGRAD_TUNE_KEY = FWD_KEY + ["stride_dxn"]
conv2d_fwd = _tuned(_conv2d_fwd_kernel, FWD_TUNE_KEY)
# The BatchNorm-statistics forward (STATS) is launched untuned, with one config a
# function of the launch shape (vhist.ops.conv.stats_config): the number of
# (count, mean, M2) partials and the order of every sum then do not depend on which
# config a process's autotuning picked, so the statistics are reproducible bit for bit.
conv2d_fwd_stats = _conv2d_fwd_kernel
conv2d_bwd_dgrad = _tuned(_conv2d_bwd_dgrad_kernel, DGRAD_TUNE_KEY)
conv2d_fwd_stem = autotune(STEM_FWD_CONFIGS, FWD_TUNE_KEY)(_conv2d_fwd_kernel)
conv2d_bwd_dgrad_stem = autotune(STEM_DGRAD_CONFIGS, DGRAD_TUNE_KEY)(_conv2d_bwd_dgrad_kernel)
conv2d_bwd_wgrad = _tuned(_conv2d_bwd_wgrad_kernel, FWD_KEY + ["POS_PER_SPLIT", "HAS_DBIAS", "GROUPS", "PROLOGUE"])
conv2d_bwd_wgrad_reduce = _conv2d_bwd_wgrad_reduce_kernel
conv2d_fwd_pad = _conv2d_fwd_pad_kernel
PAD_BLOCK_R = 128
