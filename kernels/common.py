"""``@triton.jit`` helpers shared by the BatchNorm, conv and depthwise kernels, the tile
product of the conv and attention kernels (``mma``) and the second stage of the
deterministic column sums (LayerNorm, bias + GELU).

Activation codes (the ``ACTIVATION`` constexpr; :class:`vhist.ops.common.Activation`):
0 none, 1 ReLU, 2 ReLU6, 3 SiLU, 4 Hardswish, 5 LeakyReLU (slope the ``NEG_SLOPE``
constexpr), 6 GELU (erf), 7 GELU (tanh approximation), 8 Sigmoid, 9 Hardsigmoid.
"""
import triton
import triton.language as tl


# The constants are written out (sqrt(2/pi), 1/sqrt(2), 1/sqrt(2 pi), 0.044715): module
# globals would have to be constexprs, which the interpreter does not multiply with tensors.


@triton.jit
def tanh(u):
    # 1 - 2 / (exp(2u) + 1): saturates to +-1 at large |u| (no Inf / Inf) without a
    # libdevice call; NaN stays NaN.
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def sigmoid(z):
    # PyTorch's 1 / (1 + exp(-z)): 0 at -Inf, 1 at +Inf.
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def activate(z, ACTIVATION: tl.constexpr, NEG_SLOPE: tl.constexpr):
    # PyTorch's forward formulas (aten/src/ATen/native/cpu/Activation.cpp), so that NaN
    # and Inf come out where they do in torch: relu and hardtanh keep a NaN (tl.maximum's
    # default, fmax, would turn it into 0 and a diverging run into silent zeros), silu,
    # hardswish and gelu give NaN at -Inf (-Inf * 0) as torch does.
    if ACTIVATION == 1:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACTIVATION == 2:
        z = tl.minimum(tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACTIVATION == 3:  # silu (Elfwing et al., 2018): z * sigmoid(z)
        z = z / (1.0 + tl.exp(-z))
    elif ACTIVATION == 4:  # hardswish (Howard et al., 2019, MobileNetV3): z * relu6(z + 3) / 6
        z = z * tl.minimum(tl.maximum(z + 3.0, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0,
                           propagate_nan=tl.PropagateNan.ALL) / 6.0
    elif ACTIVATION == 5:  # leaky relu: z > 0 ? z : z * slope (a NaN takes the second branch, stays NaN)
        z = tl.where(z > 0.0, z, z * NEG_SLOPE)
    elif ACTIVATION == 6:  # gelu (Hendrycks & Gimpel, 2016): z * Phi(z)
        z = z * 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == 7:  # gelu, tanh approximation
        z = 0.5 * z * (1.0 + tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACTIVATION == 8:
        z = sigmoid(z)
    elif ACTIVATION == 9:  # hardsigmoid: relu6(z + 3) / 6
        z = tl.minimum(tl.maximum(z + 3.0, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0,
                       propagate_nan=tl.PropagateNan.ALL) / 6.0
    return z


@triton.jit
def activation_grad(z, g, ACTIVATION: tl.constexpr, NEG_SLOPE: tl.constexpr):
    # g * act'(z) from the pre-activation z, by PyTorch's backward formulas, kinks and NaN
    # included: threshold_backward zeroes g where z <= 0 and hardtanh_backward where
    # z <= 0 or z >= 6 (a NaN z passes g); leaky_relu_backward takes the slope where not
    # z > 0 (at 0 too); hardswish_backward is 0 for z <= -3, g * (z / 3 + 1/2) on (-3, 3)
    # and g elsewhere (at 3, and a NaN z passes g); hardsigmoid_backward is g / 6 strictly inside
    # (-3, 3), else 0 (NaN too). For ReLU and ReLU6 z may equally be the activation's
    # output (z <= 0 / z >= 6 exactly where the output is, and NaN stays NaN), which is
    # what the plain conv and depthwise ops save for them.
    if ACTIVATION == 1:
        g = tl.where(z <= 0.0, 0.0, g)
    elif ACTIVATION == 2:
        g = tl.where((z <= 0.0) | (z >= 6.0), 0.0, g)
    elif ACTIVATION == 3:  # silu' = s (1 + z (1 - s)), s = sigmoid(z)
        s = sigmoid(z)
        g = g * s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == 4:
        g = tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, g * (z / 3.0 + 0.5), g))
    elif ACTIVATION == 5:
        g = tl.where(z > 0.0, g, g * NEG_SLOPE)
    elif ACTIVATION == 6:  # gelu' = Phi(z) + z phi(z)
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        g = g * (cdf + z * (tl.exp(-0.5 * z * z) * 0.3989422804014327))
    elif ACTIVATION == 7:  # u = sqrt(2/pi) (z + 0.044715 z^3), t = tanh u: 0.5 (1 + t) + 0.5 z (1 - t^2) u'
        t = tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        g = g * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du)
    elif ACTIVATION == 8:  # sigmoid' = (1 - s) s
        s = sigmoid(z)
        g = g * (1.0 - s) * s
    elif ACTIVATION == 9:
        # PyTorch multiplies by 1/6 rounded to fp32 (1.0f / 6.0f), in fp64 too.
        g = tl.where((z > -3.0) & (z < 3.0), g * 0.1666666716337204, 0.0)
    return g


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
