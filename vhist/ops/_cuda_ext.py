"""Lazy just-in-time build of the CUDA C++ extensions in ``csrc/``.

Every op with a ``cuda`` backend keeps its sources in ``csrc/<op>/``: a ``.cpp`` torch
binding (input checks, allocation, the current stream) and ``_kernel.cu`` kernels behind
a small ``extern "C"`` launcher that takes raw pointers, sizes, strides and a
``cudaStream_t`` and includes no torch header. :func:`load_extension` compiles such a
pair with ``torch.utils.cpp_extension.load`` (ninja) on the first call that needs it,
and caches the module per process; the build directory persists across processes
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), so later processes
only re-link when a source changed. Nothing here runs at ``import vhist``: a machine
without CUDA or nvcc imports vhist fine and gets a clear :class:`RuntimeError` only
when it asks for the ``cuda`` backend.

Another op adds its extension with::

    from vhist.ops._cuda_ext import csrc_path, load_extension
    ext = load_extension("depthwise", [csrc_path("depthwise/depthwise.cpp"),
                                       csrc_path("depthwise/depthwise_kernel.cu")])
    ext.fwd(...)
"""
from __future__ import annotations

import os
import shutil
import threading
from types import ModuleType
from typing import Sequence

import torch

# csrc/ sits next to the vhist package in the repository (an editable install).
CSRC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
# The C++ standard is left to torch (it sets the one its headers need).
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]

_modules: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}
_lock = threading.Lock()


def csrc_path(relative: str) -> str:
    """Absolute path of ``csrc/<relative>``."""
    return os.path.join(CSRC_DIR, relative)


def _cuda_home() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def _nvcc() -> str | None:
    home = _cuda_home()
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def unavailable_reason() -> str | None:
    """Why no CUDA extension can be built or run in this process, or None if one can."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if _nvcc() is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    try:
        import ninja  # noqa: F401
    except ImportError:
        if shutil.which("ninja") is None:
            return "ninja is not installed (pip install ninja)"
    return None


def load_extension(name: str, sources: Sequence[str], extra_cuda_cflags: Sequence[str] = (),
                   extra_cflags: Sequence[str] = ()) -> ModuleType:
    """The compiled extension ``vhist_<name>``, built on first use and cached.

    Args:
        name: short name of the extension (one per op), e.g. ``"local_response_norm"``.
        sources: the ``.cpp`` binding and ``.cu`` kernel files (absolute paths, see
            :func:`csrc_path`).
        extra_cuda_cflags, extra_cflags: flags added to the defaults for nvcc and the
            host compiler.

    Returns:
        The Python module that the binding's ``PYBIND11_MODULE`` defines.

    Raises:
        RuntimeError: CUDA, nvcc or ninja is missing, or the build failed (the compiler
            output is in the message). A failed build is not retried in this process.
    """
    with _lock:
        if name in _modules:
            return _modules[name]
        if name in _errors:
            raise RuntimeError(_errors[name])
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"vhist cuda backend ({name}): {reason}; use the triton or torch backend")
        from torch.utils.cpp_extension import load

        try:
            module = load(name=f"vhist_{name}", sources=list(sources),
                          extra_cflags=CXX_FLAGS + list(extra_cflags),
                          extra_cuda_cflags=NVCC_FLAGS + list(extra_cuda_cflags), verbose=False)
        except Exception as err:  # keep the compiler's message, and do not rebuild every call
            _errors[name] = f"vhist cuda backend ({name}): building the extension failed: {err}"
            raise RuntimeError(_errors[name]) from err
        _modules[name] = module
        return module


def status() -> dict:
    """What :func:`vhist.backend_info` reports about the CUDA extensions.

    Returns:
        ``buildable`` (bool), ``reason`` (why not, or None), ``nvcc`` (path or None),
        ``build_dir`` (where builds are cached), ``loaded`` (names built in this
        process) and ``failed`` (names whose build failed).
    """
    reason = unavailable_reason()
    build_dir = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions")
    return {"buildable": reason is None, "reason": reason, "nvcc": _nvcc(), "build_dir": build_dir,
            "loaded": sorted(_modules), "failed": sorted(_errors)}
