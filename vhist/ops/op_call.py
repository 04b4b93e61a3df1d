"""How vhist's autograd Functions call their registered custom ops.

A ``torch.library.custom_op`` call goes through the dispatcher (schema parsing of the
arguments, the Autograd, ADInplaceOrView and backend keys, a Python trampoline back
into the implementation), which costs more host time than most of the launchers' own
work. :func:`custom_op` registers the op exactly as ``torch.library.custom_op`` does
and returns an :class:`EagerOp`: called in eager mode, it runs the implementation
directly; while ``torch.compile`` traces, or under a dispatch mode (fake tensors,
``make_fx``, ``opcheck``, dispatch-level tools), it calls the registered op, so graphs
and tools still see ``vhist::<op>`` with its fake implementation.
"""
from __future__ import annotations

from typing import Callable, Iterable, Union

import torch


# Every op registered through :func:`custom_op`, by qualified name ("vhist::conv2d_fwd").
REGISTRY: dict[str, "EagerOp"] = {}


def direct_call_allowed() -> bool:
    """Whether an op may skip the dispatcher here: eager mode with no dispatch mode active
    (``torch._C._len_torch_dispatch_stack`` is the dispatcher's own count of them)."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


class EagerOp:
    """A registered custom op that runs its implementation directly in eager mode.

    Attributes:
        name: the qualified name, e.g. ``"vhist::conv2d_fwd"``.
        impl: the Python implementation.
        opdef: the ``torch.library.CustomOpDef`` (``register_fake`` and the other
            registration methods are forwarded to it).
        op: ``torch.ops.vhist.<op>``, the overload packet the dispatcher runs.
    """

    def __init__(self, name: str, impl: Callable, opdef):
        self.name, self.impl, self.opdef = name, impl, opdef
        namespace, opname = name.split("::")
        self.op = getattr(getattr(torch.ops, namespace), opname)
        self.__doc__ = impl.__doc__
        self.__name__ = opname

    def __call__(self, *args, **kwargs):
        if direct_call_allowed():
            return self.impl(*args, **kwargs)
        return self.op(*args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self.opdef, attr)


def custom_op(name: str, fn: Callable | None = None, *, mutates_args: Union[str, Iterable[str]]):
    """``torch.library.custom_op(name, fn, mutates_args=...)`` returning an :class:`EagerOp`;
    usable as a decorator like the original."""
    def register(impl: Callable) -> EagerOp:
        op = REGISTRY[name] = EagerOp(name, impl, torch.library.custom_op(name, impl, mutates_args=mutates_args))
        return op

    return register(fn) if fn is not None else register
