"""Backend dispatch and the input checks shared by every op."""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from vhist.backend import BackendUnavailable, resolve_backend, triton_interpreted

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dispatch(op: str, impls: Mapping[str, Callable], device: torch.device) -> Callable:
    """The implementation of ``op`` for the backend active on ``device``.

    Raises:
        NotImplementedError: ``op`` has no kernel for that backend. There is no fallback.
    """
    backend = resolve_backend(device)
    impl = impls.get(backend)
    if impl is None:
        raise NotImplementedError(
            f"vhist op '{op}' has no '{backend}' backend "
            f"(it has: {', '.join(sorted(impls))}); choose one with vhist.use_backend()"
        )
    if backend == "triton":
        check_triton_device(op, device)
    return impl


def triton_cpu_ready() -> bool:
    """Whether the triton backend can run CPU tensors: Triton and vhist's kernels were
    both imported under the interpreter."""
    from vhist.kernels._config import INTERPRETED

    return INTERPRETED and triton_interpreted()


def check_triton_device(op: str, device: torch.device) -> None:
    """Raises :class:`vhist.backend.BackendUnavailable` unless the triton backend can run
    on ``device``: CUDA, or CPU through Triton's interpreter, which Triton and vhist's
    kernels must both have been imported under."""
    kind = device.type
    if kind == "cpu":
        if not triton_cpu_ready():
            raise BackendUnavailable(
                f"vhist op '{op}': the triton backend runs CPU tensors only through Triton's interpreter, "
                "and this process did not start with it (TRITON_INTERPRET=1 counts only when set before "
                "triton and vhist are imported); start with TRITON_INTERPRET=1, use CUDA tensors, or "
                "choose the torch backend")
    elif kind != "cuda":
        raise BackendUnavailable(f"vhist op '{op}': the triton backend does not support device {device}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    device = None
    for t in tensors.values():
        if t is not None:
            if device is None:
                device = t.device
            elif t.device != device:
                listed = ", ".join(f"{name} on {t.device}" for name, t in tensors.items() if t is not None)
                raise ValueError(f"{op}: all tensors must be on one device, got {listed}")


def check_float_dtype(op: str, name: str, tensor: torch.Tensor | None) -> None:
    if tensor is not None and tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {tensor.dtype}; supported: float16, bfloat16, float32, float64"
        )


# Per device type, read once. cpu, cuda and meta are filled at import: a first fill
# inside a frame Dynamo traces would fail its guards ("Guard failed on the same frame it
# was created"); other device types are read on first use.
_AUTOCAST_AVAILABLE: dict[str, bool] = {t: torch.amp.is_autocast_available(t) for t in ("cpu", "cuda", "meta")}


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple:
    """The tensors of a convolution in the autocast dtype when autocast is on for their
    device, as PyTorch's autocast treats ``F.conv2d`` (fp64 and non-float tensors stay;
    BatchNorm parameters and statistics are not passed here and keep their dtype)."""
    first = tensors[0]
    device_type = "cuda" if first.is_cuda else "cpu" if first.is_cpu else first.device.type  # (device.type is slow)
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:
        available = _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    if not available or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def autocast_fp32_inputs(*tensors: torch.Tensor | None) -> tuple:
    """The tensors of an op on CUDA's autocast fp32 list (``layer_norm``) in fp32 while
    CUDA autocast is on, as PyTorch's autocast casts them (CPU autocast keeps
    ``layer_norm`` in the input's dtype; fp64 and non-float tensors stay)."""
    first = tensors[0]
    if not first.is_cuda or not torch.is_autocast_enabled("cuda"):
        return tensors
    return tuple(t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors)
