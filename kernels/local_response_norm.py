"""Local Response Normalization kernels (Krizhevsky et al., 2012, section 3.3).

With PyTorch's convention (alpha divided by the window size n, the channel window of
channel c being [c - LO, c + HI], LO = n // 2, HI = (n - 1) // 2, clipped at the edges
and still divided by n, as F.local_response_norm's zero padding and avg_pool do):

    q_c = sum_{j = c-LO}^{c+HI} a_j^2,   s_c = k + (alpha / n) q_c,   b_c = a_c s_c^(-beta)

Every kernel sees the activation as an (N, C, S) view with strides (S the flattened
spatial extent). The launcher folds N into S when channels are innermost
(channels_last), so one kernel covers both memory formats. A program owns BLOCK_S
positions of one row n and walks the channels in order, so each window sum slides:
q_c = q_{c-1} + a_{c+HI}^2 - a_{c-LO-1}^2, O(1) loads per element; the values that
leave the window were loaded n channels earlier and come from cache.

Cancellation: a running sum that subtracts a large square keeps that square's rounding
error (a few ulps of the largest partial sum) while the window may now hold only small
values. Each running sum therefore tracks its peak since the last exact re-sum, and the
window is re-summed directly (O(n) cached loads) when (alpha/n) * peak exceeds DRIFT
times the current scale s in some lane, and in any case every RESYNC channels: the
error stays within ~RESYNC * DRIFT ulps of s. With realistic constants (k = 1 or 2,
alpha/n = 1e-4) the term alpha/n * q rarely dwarfs k, so re-sums are rare. RESYNC = 1
(small windows) is the plain direct window sum. The backward treats its running sum of
t the same way, against the running sum of |t| (a direct sum's error scale).
Powers use exp(y * log(s)): s > 0 whenever k > 0 and alpha >= 0, and
the interpreter has no libdevice pow.
"""
import triton
import triton.language as tl

from ._config import autotune

CONFIGS = [triton.Config({"BLOCK_S": bs}, num_warps=w) for bs, w in ((256, 4), (128, 4), (512, 4), (1024, 8), (64, 2))]
TUNE_KEY = ["C", "S", "stride_s", "SIZE"]
# Re-sum a running window sum once its peak since the last re-sum exceeds DRIFT times
# the current value (in units of the scale s; see _slide_sumsq).
DRIFT = tl.constexpr(4.0)


@triton.jit
def _load(X, base, c, C, stride_c, mask, ACC: tl.constexpr):
    """Channel c of the BLOCK_S positions at ``base``; zero outside [0, C) (the zero
    padding of F.local_response_norm)."""
    c_vec = c + tl.zeros_like(base)
    inside = mask & (c_vec >= 0) & (c_vec < C)
    return tl.load(X + base + c_vec * stride_c, mask=inside, other=0.0).to(ACC)


@triton.jit
def _window_sumsq(X, base, c, C, stride_c, mask, LO, HI, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    """q_c summed directly over the clipped window (exact, O(n) loads)."""
    q = tl.zeros([BLOCK_S], dtype=ACC)
    for j in range(tl.maximum(c - LO, 0), tl.minimum(c + HI + 1, C)):
        a = _load(X, base, j, C, stride_c, mask, ACC)
        q += a * a
    return q


@triton.jit
def _slide_sumsq(X, base, c, q_prev, peak_prev, step, C, stride_c, mask, LO, HI, RESYNC, alpha_over_n, k,
                 ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    """(q_c, peak) from (q_{c-1}, peak): one square enters, one leaves. ``peak`` is the
    largest partial sum since the last exact re-sum, which bounds the running sum's
    rounding error (a few ulps of it). The window is re-summed exactly at step 0, every
    RESYNC steps, and whenever (alpha/n) * peak exceeds DRIFT * s_c in some lane, so
    that error stays below ~RESYNC * DRIFT ulps of s_c."""
    a_in = _load(X, base, c + HI, C, stride_c, mask, ACC)
    a_out = _load(X, base, c - LO - 1, C, stride_c, mask, ACC)
    q_up = q_prev + a_in * a_in
    # Rounding can leave a tiny negative remainder of a sum of squares.
    q = tl.maximum(q_up - a_out * a_out, 0.0)
    peak = tl.maximum(peak_prev, q_up)
    drift = alpha_over_n * peak > DRIFT * (k + alpha_over_n * q)
    if (step % RESYNC == 0) | (tl.max(drift.to(tl.int32), axis=0) > 0):
        q = _window_sumsq(X, base, c, C, stride_c, mask, LO, HI, ACC, BLOCK_S)
        peak = q
    return q, peak


@triton.jit
def _lrn_t(X, DY, base, c, q, C, stride_c, mask, alpha_over_n, beta, k, ACC: tl.constexpr):
    """t_c = dy_c a_c s_c^(-beta-1) = dy_c b_c / s_c, the term each output gradient
    sends back through its window; zero outside [0, C)."""
    a = _load(X, base, c, C, stride_c, mask, ACC)
    dy = _load(DY, base, c, C, stride_c, mask, ACC)
    s = k + alpha_over_n * q
    return dy * a * tl.exp((-beta - 1.0) * tl.log(s))


@triton.jit
def _row_base(pid, S, stride_n, stride_s, BLOCK_S: tl.constexpr):
    blocks_per_row = tl.cdiv(S, BLOCK_S)
    n = pid // blocks_per_row
    s = (pid % blocks_per_row) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = s < S
    # int64 offsets: an activation can hold more than 2**31 elements.
    base = tl.cast(n, tl.int64) * stride_n + s.to(tl.int64) * stride_s
    return base, mask


# Forward, one pass: b_c = a_c (k + alpha/n q_c)^(-beta) with q_c slid along the
# channels (re-summed exactly every RESYNC channels or when its drift bound says so).
# Reads a once (plus cached window edges), writes b once; nothing is saved for the
# backward, which recomputes q.
@triton.jit
def _lrn_fwd_kernel(
    X,  # (N, C, S) input, any strides
    Y,  # (N, C, S) output, same strides as X
    N, C, S,
    stride_n, stride_c, stride_s,
    LO, HI, RESYNC, alpha_over_n, beta, k,
    SIZE: tl.constexpr,  # window size n (a tuning key only)
    ACC: tl.constexpr, BLOCK_S: tl.constexpr,
):
    base, mask = _row_base(tl.program_id(0), S, stride_n, stride_s, BLOCK_S)
    q = tl.zeros([BLOCK_S], dtype=ACC)
    peak = tl.zeros([BLOCK_S], dtype=ACC)
    for c in range(0, C):
        q, peak = _slide_sumsq(X, base, c, q, peak, c, C, stride_c, mask, LO, HI, RESYNC, alpha_over_n, k,
                               ACC, BLOCK_S)
        a = _load(X, base, c, C, stride_c, mask, ACC)
        b = a * tl.exp(-beta * tl.log(k + alpha_over_n * q))
        tl.store(Y + base + tl.cast(c, tl.int64) * stride_c, b.to(Y.dtype.element_ty), mask=mask)


# Backward, one fused pass. Differentiating b_c = a_c s_c^(-beta):
#   dL/da_i = dy_i s_i^(-beta) - (2 alpha beta / n) a_i sum_{c : i in window(c)} t_c,
#   t_c = dy_c a_c s_c^(-beta-1).
# i lies in window(c) = [c-LO, c+HI] iff c lies in [i-HI, i+LO]: the transposed window
# (for even n the asymmetry flips). Step m computes t_m at the leading channel, adds it
# to T (the sum of the last n t's, which is the transposed window of i = m - LO) and
# removes t_{m-n}; three running window sums give s at m, at i and at m - n. Nothing
# from the forward is read but a: q is recomputed, which moves fewer bytes than saving it.
@triton.jit
def _lrn_bwd_kernel(
    X,   # (N, C, S) forward input
    DY,  # (N, C, S) upstream gradient, same strides as X
    DX,  # (N, C, S) input gradient, same strides as X
    N, C, S,
    stride_n, stride_c, stride_s,
    LO, HI, RESYNC, alpha_over_n, beta, k,
    SIZE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr,
):
    base, mask = _row_base(tl.program_id(0), S, stride_n, stride_s, BLOCK_S)
    q_lead = tl.zeros([BLOCK_S], dtype=ACC)
    q_mid = tl.zeros([BLOCK_S], dtype=ACC)
    q_trail = tl.zeros([BLOCK_S], dtype=ACC)
    p_lead = tl.zeros([BLOCK_S], dtype=ACC)
    p_mid = tl.zeros([BLOCK_S], dtype=ACC)
    p_trail = tl.zeros([BLOCK_S], dtype=ACC)
    t_sum = tl.zeros([BLOCK_S], dtype=ACC)  # T: sum of t over the last n channels
    t_abs = tl.zeros([BLOCK_S], dtype=ACC)  # sum of |t| over the same window
    t_peak = tl.zeros([BLOCK_S], dtype=ACC)  # largest sum of |t| since T's last re-sum
    for m in range(0, C + LO):
        q_lead, p_lead = _slide_sumsq(X, base, m, q_lead, p_lead, m, C, stride_c, mask, LO, HI, RESYNC,
                                      alpha_over_n, k, ACC, BLOCK_S)
        q_trail, p_trail = _slide_sumsq(X, base, m - SIZE, q_trail, p_trail, m, C, stride_c, mask, LO, HI, RESYNC,
                                        alpha_over_n, k, ACC, BLOCK_S)
        t_in = _lrn_t(X, DY, base, m, q_lead, C, stride_c, mask, alpha_over_n, beta, k, ACC)
        t_out = _lrn_t(X, DY, base, m - SIZE, q_trail, C, stride_c, mask, alpha_over_n, beta, k, ACC)
        abs_up = t_abs + tl.abs(t_in)
        t_sum = t_sum + t_in - t_out
        t_abs = tl.maximum(abs_up - tl.abs(t_out), 0.0)
        t_peak = tl.maximum(t_peak, abs_up)
        # T's rounding error is a few ulps of t_peak; the direct sum's is a few ulps of t_abs.
        drift = t_peak > DRIFT * t_abs
        if (m % RESYNC == 0) | (tl.max(drift.to(tl.int32), axis=0) > 0):
            t_sum = tl.zeros([BLOCK_S], dtype=ACC)
            t_abs = tl.zeros([BLOCK_S], dtype=ACC)
            for c in range(tl.maximum(m - SIZE + 1, 0), tl.minimum(m + 1, C)):
                q_c = _window_sumsq(X, base, c, C, stride_c, mask, LO, HI, ACC, BLOCK_S)
                t_c = _lrn_t(X, DY, base, c, q_c, C, stride_c, mask, alpha_over_n, beta, k, ACC)
                t_sum += t_c
                t_abs += tl.abs(t_c)
            t_peak = t_abs
        i = m - LO
        q_mid, p_mid = _slide_sumsq(X, base, i, q_mid, p_mid, m, C, stride_c, mask, LO, HI, RESYNC,
                                    alpha_over_n, k, ACC, BLOCK_S)
        if i >= 0:
            a = _load(X, base, i, C, stride_c, mask, ACC)
            dy = _load(DY, base, i, C, stride_c, mask, ACC)
            # Scalar products would round in fp32; keep them in the tensors' ACC.
            dx = dy * tl.exp(-beta * tl.log(k + alpha_over_n * q_mid)) - a * t_sum * alpha_over_n * (2.0 * beta)
            tl.store(DX + base + tl.cast(i, tl.int64) * stride_c, dx.to(DX.dtype.element_ty), mask=mask)


lrn_fwd = autotune(CONFIGS, TUNE_KEY)(_lrn_fwd_kernel)
lrn_bwd = autotune(CONFIGS, TUNE_KEY)(_lrn_bwd_kernel)
