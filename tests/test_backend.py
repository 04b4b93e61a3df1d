"""Backend selection: context manager, environment variable, defaults and errors."""
import pytest
import torch

import vhist
from vhist import backend_info, resolve_backend, use_backend
from vhist.ops._dispatch import dispatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_defaults_per_device(monkeypatch):
    monkeypatch.delenv("VHIST_BACKEND", raising=False)
    assert resolve_backend(CPU) == "torch"
    assert resolve_backend(CUDA) == "triton"
    assert backend_info()["backend"] is None and backend_info()["source"] == "default"


def test_env_var_and_context_precedence(monkeypatch):
    monkeypatch.setenv("VHIST_BACKEND", "triton")
    assert resolve_backend(CPU) == "triton"
    assert backend_info()["source"] == "$VHIST_BACKEND"
    with use_backend("torch"):
        assert resolve_backend(CUDA) == "torch"
        with use_backend("cuda"):
            assert resolve_backend(CPU) == "cuda"
            assert backend_info() | {"backend": "cuda", "source": "use_backend() context"} == backend_info()
        assert resolve_backend(CPU) == "torch"
    assert resolve_backend(CPU) == "triton"


def test_unknown_backend_lists_valid_ones(monkeypatch):
    with pytest.raises(ValueError, match="triton, cuda, torch"):
        with use_backend("cudnn"):
            pass
    monkeypatch.setenv("VHIST_BACKEND", "tpu")
    with pytest.raises(ValueError, match="'tpu'.*VHIST_BACKEND.*triton, cuda, torch"):
        resolve_backend(CPU)


def test_missing_kernel_raises_naming_op_and_backend():
    x = torch.randn(4, 3, 2, 2)
    with use_backend("cuda"), pytest.raises(NotImplementedError, match="'batch_norm' has no 'cuda' backend"):
        vhist.ops.batch_norm(x, None, None, training=True)


def test_context_restored_after_error():
    with pytest.raises(RuntimeError):
        with use_backend("torch"):
            raise RuntimeError("boom")
    assert backend_info()["source"] != "use_backend() context"


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    import vhist.kernels._config as config

    monkeypatch.setattr(config, "INTERPRETED", False)
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch("batch_norm", {"triton": lambda: None}, CPU)


def test_interpreter_mode_is_what_triton_decided_at_import(monkeypatch):
    # Without CUDA the suite starts with TRITON_INTERPRET=1 (conftest); changing it now changes nothing.
    started = backend_info()["triton_interpret"]
    assert started is (not torch.cuda.is_available())
    monkeypatch.setenv("TRITON_INTERPRET", "0" if started else "1")
    assert backend_info()["triton_interpret"] is started
    if started:
        with use_backend("triton"):
            assert dispatch("batch_norm", {"triton": lambda: "ran"}, CPU)() == "ran"


def test_bad_env_backend_is_reported_not_raised(monkeypatch):
    monkeypatch.setenv("VHIST_BACKEND", "nope")
    info = backend_info()
    assert info["backend"] is None and "'nope'" in info["error"] and "triton, cuda, torch" in info["error"]
