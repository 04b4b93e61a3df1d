"""``@triton.jit`` helpers shared by the BatchNorm, conv and depthwise kernels.

Activation codes (the ``ACTIVATION`` constexpr; :class:`vhist.ops.common.Activation`):
0 none, 1 ReLU, 2 ReLU6.
"""
import triton
import triton.language as tl


@triton.jit
def activate(z, ACTIVATION: tl.constexpr):
    # 0: identity, 1: relu, 2: relu6 = min(max(z, 0), 6)
    if ACTIVATION == 1:
        z = tl.maximum(z, 0.0)
    elif ACTIVATION == 2:
        z = tl.minimum(tl.maximum(z, 0.0), 6.0)
    return z


@triton.jit
def activation_grad_mask(z, ACTIVATION: tl.constexpr):
    # Where the activation's derivative is 1 (else 0), as PyTorch's relu / hardtanh
    # backward define it. Evaluated on the pre-activation, or equally on the output.
    if ACTIVATION == 1:
        keep = z > 0.0
    elif ACTIVATION == 2:
        keep = (z > 0.0) & (z < 6.0)
    else:
        keep = z == z
    return keep


@triton.jit
def chan_merge(count, mean, m2, count_b, mean_b, m2_b):
    # Chan, Golub & LeVeque (1979), the pairwise update of (count, mean, M2) with the
    # statistics of a second set b:
    #   delta = m_b - m_a,  m = m_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.
    # Nothing forms E[x^2] - E[x]^2, so |mean| >> std does not cancel.
    new_count = count + count_b
    delta = mean_b - mean
    mean += delta * (count_b / new_count)
    m2 += m2_b + delta * delta * (count * count_b / new_count)
    return new_count, mean, m2
