"""The ``vhist`` backend of ``torch.compile``: the rewrite of :mod:`vhist.convert.rewrite`
on each graph Dynamo captures (every piece between graph breaks is its own graph), the
rest compiled by Inductor.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``torch.compile(model, backend="vhist")`` finds it without importing vhist first and
without registering anything in torch at import.
"""
from __future__ import annotations

from torch import fx


def backend(gm: fx.GraphModule, example_inputs, *, inner=None):
    """Rewrites the captured graph ``gm`` onto vhist's ops, then compiles it with Inductor.

    Dynamo hands nn modules inlined: convs are ``torch.conv2d`` calls and BatchNorms
    ``F.batch_norm`` calls whose parameters and buffers are graph inputs, so the
    functional side of the rewrite matches them.

    Args:
        gm, example_inputs: what Dynamo gives a backend.
        inner: the backend that compiles the rewritten graph (a name or a callable;
            default Inductor). The tests pass "aot_eager", which runs the same graph
            through AOTAutograd without Inductor's code generation.
    """
    from vhist.convert.rewrite import rewrite

    rewrite(gm.graph, dict(gm.named_modules()))
    gm.recompile()
    if inner is None:
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    if isinstance(inner, str):
        from torch._dynamo.backends.registry import lookup_backend

        inner = lookup_backend(inner)
    return inner(gm, example_inputs)


def prime(device) -> None:
    """Runs one tiny vhist op eagerly on ``device``, before a first compiled call: vhist's
    ops fill per-device caches (autocast availability) on their first call, and Dynamo
    fails a guard ("Guard failed on the same frame it was created") when that first call
    happens inside the frame it traces."""
    import torch

    from vhist.nn import functional as VF

    probe = torch.zeros(1, 1, 1, 1, device=device)
    VF.conv2d(probe, probe)


__all__ = ["backend", "prime"]
