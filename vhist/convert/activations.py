"""The activations a rewrite recognizes in a traced graph, as modules, functions or
methods (in place or not), and the name vhist's kernels know each one by.

Which of them the kernels run is asked of :data:`vhist.ops.common.ACTIVATION_CODES` at
run time, so the converter covers whatever the kernels support; an activation
recognized here but not supported there stays as it was, and the report says so.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from vhist.ops.common import ACTIVATION_CODES


@dataclass(frozen=True)
class Activation:
    """An activation node: its kernel name and keyword arguments (``negative_slope``)."""

    name: str
    kwargs: dict = field(default_factory=dict)

    @property
    def supported(self) -> bool:
        """Whether vhist's fused epilogues run it (asked of the kernels' table now)."""
        return self.name in ACTIVATION_CODES

    def label(self) -> str:
        if self.name == "leaky_relu":
            return f"leaky_relu({self.kwargs['negative_slope']:g})"
        return self.name


def _arg(node: fx.Node, index: int, key: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def _hardtanh(node: fx.Node, first: int) -> Optional[Activation]:
    low, high = _arg(node, first, "min_val", -1.0), _arg(node, first + 1, "max_val", 1.0)
    return Activation("relu6") if (low, high) == (0.0, 6.0) else None


def _gelu(approximate) -> Optional[Activation]:
    return {"none": Activation("gelu"), "tanh": Activation("gelu_tanh")}.get(approximate)


def _leaky(slope) -> Optional[Activation]:
    return Activation("leaky_relu", {"negative_slope": float(slope)}) if isinstance(slope, (int, float)) else None


def _from_module(m: nn.Module) -> Optional[Activation]:
    simple = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
              nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}
    name = simple.get(type(m))
    if name is not None:
        return Activation(name)
    if type(m) is nn.LeakyReLU:
        return _leaky(m.negative_slope)
    if type(m) is nn.GELU:
        return _gelu(m.approximate)
    if type(m) is nn.Hardtanh and (m.min_val, m.max_val) == (0.0, 6.0):
        return Activation("relu6")
    return None


_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu6",
              F.silu: "silu", F.hardswish: "hardswish", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
              torch.sigmoid_: "sigmoid", F.hardsigmoid: "hardsigmoid"}
_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}


def activation_of(node: fx.Node, modules: dict) -> Optional[Activation]:
    """The activation ``node`` applies to its first argument, or None if it is not one."""
    if node.op == "call_module":
        m = modules.get(node.target)
        return _from_module(m) if m is not None else None
    if node.op == "call_function":
        target = node.target
        if target in (F.hardtanh, F.hardtanh_):
            return _hardtanh(node, 1)
        if target is F.leaky_relu:
            return _leaky(_arg(node, 1, "negative_slope", 0.01))
        if target is F.gelu:
            return _gelu(_arg(node, 1, "approximate", "none"))
        name = _FUNCTIONS.get(target)
        return Activation(name) if name is not None else None
    if node.op == "call_method":
        name = _METHODS.get(node.target)
        return Activation(name) if name is not None else None
    return None


_ADDS = (operator.add, operator.iadd, torch.add)


def is_add(node: fx.Node) -> bool:
    """Whether ``node`` is ``a + b`` of two tensors (``+``, ``+=``, ``torch.add`` /
    ``Tensor.add`` / ``add_`` without ``alpha``)."""
    if node.op == "call_function" and node.target in _ADDS:
        pass
    elif not (node.op == "call_method" and node.target in ("add", "add_")):
        return False
    return (len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args))


def torch_activation(x: torch.Tensor, name: Optional[str], kwargs: dict) -> torch.Tensor:
    """The PyTorch op a model wrote for activation ``name`` (where vhist runs a conv whose
    activation it cannot fuse, the activation runs as the model had it)."""
    if name is None:
        return x
    if name == "leaky_relu":
        return F.leaky_relu(x, kwargs["negative_slope"])
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish, "gelu": F.gelu,
            "sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}[name](x)
