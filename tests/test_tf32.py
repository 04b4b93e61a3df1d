"""The fp32 convs follow PyTorch's TF32 setting through both of torch's APIs: the legacy
``torch.backends.cudnn.allow_tf32`` flag and the ``fp32_precision`` properties."""
import pytest
import torch
import torch.nn.functional as F

import vhist
from vhist.ops import common, conv, launch_cache

from utils import assert_close

NEW_API = hasattr(torch._C, "_get_fp32_precision_getter")
PRECISION_LEVELS = [("generic", "all"), ("cuda", "all"), ("cuda", "conv"), ("cuda", "rnn")]


@pytest.fixture
def restore_tf32():
    """Puts torch's TF32 state (legacy flag, or every precision level) back after the test,
    and empties the launch caches around it (conv plans hold the precision)."""
    if NEW_API:
        saved = [(level, torch._C._get_fp32_precision_getter(*level)) for level in PRECISION_LEVELS]
    else:
        saved = torch.backends.cudnn.allow_tf32
    launch_cache.clear()
    yield
    launch_cache.clear()
    if NEW_API:
        for level, value in saved:
            torch._C._set_fp32_precision_setter(*level, value)
        assert [torch._C._get_fp32_precision_getter(*level) for level, _ in saved] == [v for _, v in saved]
    else:
        torch.backends.cudnn.allow_tf32 = saved


def _conv_precisions(monkeypatch):
    """Runs a small fp32 conv forward and backward on the triton backend against F.conv2d
    and returns the INPUT_PRECISION of every GEMM plan it built."""
    seen = []
    precision_of = conv._precision_of

    def spy(dtype, allow_tf32):
        options = precision_of(dtype, allow_tf32)
        seen.append(options["INPUT_PRECISION"])
        return options

    monkeypatch.setattr(conv, "_precision_of", spy)
    launch_cache.clear()
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    with vhist.use_backend("triton"):
        out = vhist.ops.conv2d(x, w, None, padding=1)
        grads = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    ref = F.conv2d(x, w, padding=1)
    assert_close(out, ref, atol=1e-4, rtol=1e-4)
    ref_grads = torch.autograd.grad(ref, (x, w), torch.ones_like(ref))
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert len(seen) == 3  # forward, dgrad, wgrad
    return set(seen)


@pytest.mark.parametrize("allow", [False, True])
def test_legacy_allow_tf32_flag(restore_tf32, monkeypatch, allow):
    torch.backends.cudnn.allow_tf32 = allow
    assert common.cudnn_allow_tf32() is allow
    assert _conv_precisions(monkeypatch) == {"tf32" if allow else "ieee"}


@pytest.mark.skipif(not NEW_API, reason="torch before the fp32_precision API")
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fp32_precision_api(restore_tf32, monkeypatch, precision):
    """cudnn.conv.fp32_precision set on its own (the RNN setting left different, where
    torch's legacy getter raises); then "none" inherits from cudnn.fp32_precision and
    from torch.backends.fp32_precision."""
    other = "tf32" if precision == "ieee" else "ieee"
    torch.backends.cudnn.rnn.fp32_precision = other
    torch.backends.cudnn.conv.fp32_precision = precision
    assert common.cudnn_allow_tf32() is (precision == "tf32")
    assert _conv_precisions(monkeypatch) == {precision}
    torch.backends.cudnn.conv.fp32_precision = "none"
    torch.backends.cudnn.fp32_precision = precision
    torch.backends.fp32_precision = other
    assert common.cudnn_allow_tf32() is (precision == "tf32")
    torch.backends.cudnn.fp32_precision = "none"
    assert common.cudnn_allow_tf32() is (other == "tf32")
    torch.backends.fp32_precision = "none"
    assert common.cudnn_allow_tf32() is False
