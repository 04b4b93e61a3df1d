"""``@triton.jit`` helpers shared by the BatchNorm, conv and depthwise kernels, the tile
product of the conv and attention kernels (``mma``) and the second stage of the
deterministic column sums (LayerNorm, bias + GELU).

Activation codes (the ``ACTIVATION`` constexpr; :class:`vhist.ops.common.Activation`):
0 none, 1 ReLU, 2 ReLU6.
"""
import triton
import triton.language as tl


@triton.jit
def activate(z, ACTIVATION: tl.constexpr):
    # 0: identity, 1: relu, 2: relu6 = min(max(z, 0), 6). NaN propagates, as in
    # torch.relu and F.hardtanh: tl.maximum's default (fmax) would turn a NaN into 0 and
    # a diverging run into silent zeros.
    if ACTIVATION == 1:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACTIVATION == 2:
        z = tl.minimum(tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0, propagate_nan=tl.PropagateNan.ALL)
    return z


@triton.jit
def activation_grad_mask(z, ACTIVATION: tl.constexpr):
    # Where the gradient passes (else 0), as PyTorch's backward kernels test it:
    # threshold_backward zeroes it where z <= 0, hardtanh_backward where z <= 0 or
    # z >= 6, so a NaN z passes it. Evaluated on the pre-activation, or equally on the
    # output (the activation keeps NaN, and z <= 0 / z >= 6 exactly where its output is).
    if ACTIVATION == 1:
        keep = (z > 0.0) | (z != z)
    elif ACTIVATION == 2:
        keep = ((z > 0.0) & (z < 6.0)) | (z != z)
    else:
        keep = tl.full(z.shape, 1, tl.int1)
    return keep


@triton.jit
def chan_merge(count, mean, m2, count_b, mean_b, m2_b):
    # Chan, Golub & LeVeque (1979), the pairwise update of (count, mean, M2) with the
    # statistics of a second set b:
    #   delta = m_b - m_a,  m = m_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.
    # Nothing forms E[x^2] - E[x]^2, so |mean| >> std does not cancel. The mean is
    # taken as the weighted average m_a * n_a / n + m_b * n_b / n (equal in exact
    # arithmetic): an Inf mean then stays Inf as in PyTorch's sum / n, where
    # m_a + delta * n_b / n gives Inf - Inf = NaN.
    new_count = count + count_b
    delta = mean_b - mean
    mean = mean * (count / new_count) + mean_b * (count_b / new_count)
    m2 += m2_b + delta * delta * (count * count_b / new_count)
    return new_count, mean, m2


@triton.jit
def mma(acc, a, b, FMA: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # acc += a @ b; the FMA form (fp64, which the tensor-core dot does not take on every
    # GPU Triton targets) is a broadcast multiply and a sum over K.
    if FMA:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


# Second stage of a deterministic per-column reduction (LayerNorm's dw / db, the bias
# gradient of bias + GELU): the first stage wrote one row of partials per program of a
# row partition fixed by the shape; column block j sums the P rows of up to two partial
# buffers in row order, BLOCK_P at a time (a fixed tree for a given P), so the result
# does not depend on the device or on scheduling, unlike the atomics or locks of
# Triton's layer-norm tutorial.
@triton.jit
def _partials_sum_kernel(
    PartA,  # (P, N) partials of the first sum, ACC (HAS_A)
    PartB,  # (P, N) partials of the second sum, ACC (HAS_B)
    A,      # (N,) first sum, in its output dtype
    B,      # (N,) second sum, in its output dtype
    P, N,
    HAS_A: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    a = tl.zeros([BLOCK_P, BLOCK_N], dtype=ACC)
    b = tl.zeros([BLOCK_P, BLOCK_N], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & (cols < N)[None, :]
        offs = p.to(tl.int64)[:, None] * N + cols[None, :]
        if HAS_A:
            a += tl.load(PartA + offs, mask=mask, other=0.0)
        if HAS_B:
            b += tl.load(PartB + offs, mask=mask, other=0.0)
    if HAS_A:
        tl.store(A + cols, tl.sum(a, axis=0).to(A.dtype.element_ty), mask=cols < N)
    if HAS_B:
        tl.store(B + cols, tl.sum(b, axis=0).to(B.dtype.element_ty), mask=cols < N)


partials_sum = _partials_sum_kernel
