"""Test harness: Triton's interpreter on machines without CUDA, fixed seeds, TF32 off
for references, and the ``gpu`` marker."""
import os

import torch

if not torch.cuda.is_available():
    # Must happen before triton is imported (vhist.kernels reads it at import).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import vhist  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Backends whose kernels the suite can run here: the interpreter runs Triton on CPU;
# the CUDA backend needs a GPU.
HAS_GPU = torch.cuda.is_available()


def pytest_configure(config):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def patch_heuristic(monkeypatch):
    """``patch_heuristic(name, value)`` sets ``vhist.ops.heuristics.<name>`` for the test
    and empties the launch caches (:mod:`vhist.ops.launch_cache`) before and after, since
    the launch plans cached there hold what the heuristics gave."""
    from vhist.ops import heuristics, launch_cache

    def patch(name, value):
        monkeypatch.setattr(heuristics, name, value)
        launch_cache.clear()

    yield patch
    launch_cache.clear()


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def triton_backend():
    with vhist.use_backend("triton"):
        yield
