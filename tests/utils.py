"""Comparison helpers that say where and by how much a result is off."""
import torch


def assert_close(actual, expected, *, atol, rtol, name="tensor"):
    """``torch.testing.assert_close`` that also reports the largest absolute and relative
    error and the index where each occurs."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    try:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    except AssertionError as err:
        a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
        abs_err = (a - e).abs()
        rel_err = abs_err / e.abs().clamp_min(1e-12)
        at_abs = tuple(int(i) for i in torch.unravel_index(abs_err.argmax(), a.shape))
        at_rel = tuple(int(i) for i in torch.unravel_index(rel_err.argmax(), a.shape))
        raise AssertionError(
            f"{name}: max abs err {abs_err.max().item():.3e} at {at_abs}, "
            f"max rel err {rel_err.max().item():.3e} at {at_rel}\n{err}") from None


def max_error(actual, reference) -> float:
    return (actual.detach().double() - reference.detach().double()).abs().max().item()


def assert_low_precision_close(ours, theirs, reference, *, factor, name="tensor", floor=1e-6):
    """The three-way rule for fp16/bf16: our error against an fp32 (or fp64) reference is
    at most ``factor`` times PyTorch's own error in the same low precision."""
    ours_err, theirs_err = max_error(ours, reference), max_error(theirs, reference)
    assert ours_err <= factor * theirs_err + floor, (
        f"{name}: our max error {ours_err:.3e} > {factor} x PyTorch's {theirs_err:.3e}")
