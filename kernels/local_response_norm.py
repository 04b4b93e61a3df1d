"""Local Response Normalization kernels (Krizhevsky et al., 2012, section 3.3).

With PyTorch's convention (alpha divided by the window size n, the channel window of
channel c being [c - LO, c + HI], LO = n // 2, HI = (n - 1) // 2, clipped at the edges
and still divided by n, as F.local_response_norm's zero padding and avg_pool do):

    q_c = sum_{j = c-LO}^{c+HI} a_j^2,   s_c = k + (alpha / n) q_c,   b_c = a_c s_c^(-beta)

Every kernel sees the activation as an (N, C, S) view with strides (S the flattened
spatial extent). The launcher folds N into S when channels are innermost
(channels_last), so one kernel covers both memory formats. A program owns a
[BLOCK_S positions, BLOCK_C >= C channels] tile: every channel of its positions. The
tile is loaded once along whichever axis is contiguous (channels for channels_last,
positions for NCHW), so the loads coalesce and, on 16-byte-aligned rows, are 128-bit;
the window sums are then formed in registers, as direct sums of the n shifted copies
of the tile: within a thread's group of 4 channels a shift is a choice of register, and
only the terms that cross a group edge move between lanes (see _window_sum). A direct
n-term sum of squares cancels nothing; there is no running sum.
Powers use exp(y * log(s)): s > 0 whenever k > 0 and alpha >= 0, and the interpreter
has no libdevice pow.
"""
import triton
import triton.language as tl

from ._config import autotune

# TILE: elements of the [BLOCK_S, BLOCK_C] tile (BLOCK_S = TILE / BLOCK_C, at least 1).
CONFIGS = [triton.Config({"TILE": t}, num_warps=w) for t, w in ((2048, 4), (4096, 8), (1024, 4), (4096, 4), (8192, 8))]
TUNE_KEY = ["N", "C", "S", "stride_xs", "LO", "HI"]


def block_s(tile: int, block_c: int) -> int:
    """Positions per program for a TILE-element tile of BLOCK_C channels (as the kernels)."""
    return triton.cdiv(tile, block_c)


@triton.jit
def _tile(N, C, S, stride_xn, stride_xc, stride_xs, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
          FULL_C: tl.constexpr):
    """Offsets and mask of the program's [BLOCK_S, BLOCK_C] tile (FULL_C: C == BLOCK_C, no
    channel mask)."""
    blocks_per_row = tl.cdiv(S, BLOCK_S)
    pid = tl.program_id(0)
    n = pid // blocks_per_row
    s = (pid % blocks_per_row) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    # int64 offsets: an activation can hold more than 2**31 elements.
    offs = (tl.cast(n, tl.int64) * stride_xn + s.to(tl.int64) * stride_xs)[:, None] \
        + c.to(tl.int64)[None, :] * stride_xc
    if FULL_C:
        # One predicate per position instead of one per element: with a channel mask,
        # triton 3.6's ptxas kept one of the packed predicates of an NCHW 8 x 256 tile
        # at 4 warps in an 8-byte stack frame (static, sm_90 compile, AlexNet's lrn2).
        mask = tl.broadcast_to((s < S)[:, None], [BLOCK_S, BLOCK_C])
    else:
        mask = (s < S)[:, None] & (c < C)[None, :]
    return offs, mask


@triton.jit
def _column(e0, e1, e2, e3, R: tl.constexpr):
    """e_R, R a compile-time index (trace-time selection, no code)."""
    if R == 0:
        return e0
    elif R == 1:
        return e1
    elif R == 2:
        return e2
    else:
        return e3


@triton.jit
def _shift_groups(x, GO: tl.constexpr, G: tl.constexpr):
    """x[:, g + GO] over the G groups of 4 channels, zero outside [0, G): the only step
    that crosses threads (one warp shuffle per element when a lane holds a group)."""
    if GO == 0:
        return x
    else:
        g = tl.arange(0, G) + GO
        src = tl.broadcast_to(tl.minimum(tl.maximum(g, 0), G - 1)[None, :], x.shape)
        return tl.where(((g >= 0) & (g < G))[None, :], tl.gather(x, src, axis=1), 0.0)


@triton.jit
def _column_window(e0, e1, e2, e3, R: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, G: tl.constexpr):
    """Window sum of the channels 4g + R + d, d in [D0, D1]: channel 4g + R + d is column
    (R + d) % 4 of group g + (R + d) // 4."""
    acc = tl.zeros(e0.shape, dtype=e0.dtype)
    for d in tl.static_range(D0, D1 + 1):
        acc += _shift_groups(_column(e0, e1, e2, e3, (R + d) % 4), (R + d) // 4, G)
    return acc


@triton.jit
def _window_sum(v, D0: tl.constexpr, D1: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum_{d = D0}^{D1} v[:, c + d], zero outside [0, BLOCK_C): the direct window sum
    along the channel axis of a tile (v is zero at the padding channels >= C).

    The channels are split into groups of 4 (the 4 consecutive channels a 128-bit load
    gives one thread) and columns e_r = v[:, 4g + r], so that most shifted terms are
    another column of the same thread's registers; only the terms that cross a group
    edge move between lanes, one group shift each."""
    G: tl.constexpr = BLOCK_C // 4
    even, odd = tl.split(tl.reshape(v, [BLOCK_S, G, 2, 2]))  # channels 4g + {0, 2} and 4g + {1, 3}
    e0, e2 = tl.split(even)
    e1, e3 = tl.split(odd)
    q0 = _column_window(e0, e1, e2, e3, 0, D0, D1, G)
    q1 = _column_window(e0, e1, e2, e3, 1, D0, D1, G)
    q2 = _column_window(e0, e1, e2, e3, 2, D0, D1, G)
    q3 = _column_window(e0, e1, e2, e3, 3, D0, D1, G)
    return tl.reshape(tl.join(tl.join(q0, q2), tl.join(q1, q3)), [BLOCK_S, BLOCK_C])


# Forward, one pass: b = a (k + alpha/n q)^(-beta), q the direct window sum of a^2 over
# the tile's channels. Reads a once and writes b once; nothing is saved for the
# backward, which recomputes q.
@triton.jit
def _lrn_fwd_kernel(
    X,  # (N, C, S) input, any strides
    Y,  # (N, C, S) output, same strides as X
    N, C, S,
    stride_xn, stride_xc, stride_xs,
    alpha_over_n, beta, k,
    LO: tl.constexpr, HI: tl.constexpr,  # window [c - LO, c + HI], clipped to BLOCK_C - 1
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, TILE: tl.constexpr, FULL_C: tl.constexpr = False,
):
    BLOCK_S: tl.constexpr = (TILE + BLOCK_C - 1) // BLOCK_C
    offs, mask = _tile(N, C, S, stride_xn, stride_xc, stride_xs, BLOCK_S, BLOCK_C, FULL_C)
    a = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    q = _window_sum(a * a, -LO, HI, BLOCK_S, BLOCK_C)
    b = a * tl.exp(-beta * tl.log(k + alpha_over_n * q))
    tl.store(Y + offs, b.to(Y.dtype.element_ty), mask=mask)


# Backward, one pass. Differentiating b_c = a_c s_c^(-beta):
#   dL/da_i = dy_i s_i^(-beta) - (2 alpha beta / n) a_i sum_{c : i in window(c)} t_c,
#   t_c = dy_c a_c s_c^(-beta-1).
# i lies in window(c) = [c-LO, c+HI] iff c lies in [i-HI, i+LO]: the transposed window
# (for even n the asymmetry flips). Both window sums are direct sums over the tile's
# channels; q is recomputed from a, which moves fewer bytes than saving it.
@triton.jit
def _lrn_bwd_kernel(
    X,   # (N, C, S) forward input
    DY,  # (N, C, S) upstream gradient, same strides as X
    DX,  # (N, C, S) input gradient, same strides as X
    N, C, S,
    stride_xn, stride_xc, stride_xs,
    alpha_over_n, beta, k,
    LO: tl.constexpr, HI: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, TILE: tl.constexpr, FULL_C: tl.constexpr = False,
):
    BLOCK_S: tl.constexpr = (TILE + BLOCK_C - 1) // BLOCK_C
    offs, mask = _tile(N, C, S, stride_xn, stride_xc, stride_xs, BLOCK_S, BLOCK_C, FULL_C)
    a = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    log_s = tl.log(k + alpha_over_n * _window_sum(a * a, -LO, HI, BLOCK_S, BLOCK_C))
    r = tl.exp(-beta * log_s)  # s^(-beta)
    t = dy * a * tl.exp((-beta - 1.0) * log_s)  # zero at the padding channels (a = 0)
    # Scalar products would round in fp32; keep them in the tensors' ACC.
    dx = dy * r - a * _window_sum(t, -HI, LO, BLOCK_S, BLOCK_C) * alpha_over_n * (2.0 * beta)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


lrn_fwd = autotune(CONFIGS, TUNE_KEY)(_lrn_fwd_kernel)
lrn_bwd = autotune(CONFIGS, TUNE_KEY)(_lrn_bwd_kernel)
