"""Attention reference (F.scaled_dot_product_attention)."""
import torch.nn.functional as F


def attention(query, key, value, scale=None):
    """``F.scaled_dot_product_attention`` without a mask, dropout or causality (on CPU,
    and under ``sdpa_kernel(SDPBackend.MATH)``, the math backend)."""
    return F.scaled_dot_product_attention(query, key, value, scale=scale)
