"""GELU reference (F.gelu)."""
import torch.nn.functional as F


def bias_gelu(input, bias, approximate="none"):
    """``F.gelu(input + bias, approximate=...)`` (two aten kernels; one without a bias)."""
    return F.gelu(input + bias if bias is not None else input, approximate=approximate)
