import torch.nn.functional as F


def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0):
    """PyTorch's ``F.local_response_norm`` (a composition of about seven kernels)."""
    return F.local_response_norm(input, size, alpha, beta, k)
