"""Runs a user's CNN on vhist's kernels: :func:`convert` rewrites a model's traced graph
(torch.fx), and :func:`backend` is the ``torch.compile(model, backend="vhist")``
backend, the same rewrite on each graph Dynamo captures.

This package reads models and writes calls of :mod:`vhist.nn.functional` and
:mod:`vhist.ops`; nothing below it imports it. The package itself is callable:
``vhist.convert(model)`` is :func:`convert`.
"""
import sys
import types

from vhist.convert.model import ConversionReport, convert, convert_with_report
from vhist.convert.rewrite import ConvRecord, rewrite
from vhist.convert.dynamo import backend

__all__ = ["ConversionReport", "ConvRecord", "backend", "convert", "convert_with_report", "rewrite"]


class _CallableModule(types.ModuleType):
    """``vhist.convert`` is this package and :func:`convert` at once (the package name is
    the entry point's name)."""

    def __call__(self, model, **kwargs):
        return convert(model, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
