"""The graph rewrite: conv -> BatchNorm -> residual add -> activation chains (and convs,
LRN) of a torch.fx graph, matched by dataflow, replaced by calls of
:mod:`vhist.convert.calls`.

One rewrite serves both entry points: the graphs :func:`vhist.convert` traces (modules
appear as ``call_module`` nodes) and the graphs Dynamo captures for the ``vhist``
compile backend (modules inlined: ``torch.conv2d`` / ``F.batch_norm`` calls whose
parameters are graph inputs). A chain is what the nodes compute, wherever the code that
wrote them lives: a pair split across modules, a residual added in a block's forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from vhist.convert import calls
from vhist.convert.activations import Activation, activation_of, is_add
from vhist.nn.modules.batchnorm import BatchNorm2d as VBatchNorm2d
from vhist.nn.modules.conv import Conv2d as VConv2d

_CONV_FUNCTIONS = (F.conv2d, torch.conv2d)
_BN_FUNCTIONS = (F.batch_norm,)
_LRN_FUNCTIONS = (F.local_response_norm,)
_CALL_LABELS = {calls.conv: "conv", calls.conv_bn: "conv+BN", calls.conv_bn_module: "conv+BN",
                calls.conv_act_bn: "conv+act+BN", calls.conv_act_bn_module: "conv+act+BN"}


@dataclass
class ConvRecord:
    """What became of one conv of the model.

    Attributes:
        name: the conv module's qualified name, or the graph node of a functional conv.
        macs: its multiply-adds at the report's input size (None: not measured).
        on_vhist: whether its conv runs on vhist's kernels.
        fused: what runs with it in one op ("BN+relu+residual"), empty for none.
        notes: why a neighbour was not fused, or why the conv was not converted.
        node: the name of its node in the traced graph.
    """

    name: str
    macs: Optional[int] = None
    on_vhist: bool = False
    fused: str = ""
    notes: list = field(default_factory=list)
    node: str = ""


def _conv_module(m) -> bool:
    # A subclass with a forward of its own (timm's StdConv2d, Conv2dSame) is traced through.
    return isinstance(m, nn.Conv2d) and type(m).forward in (nn.Conv2d.forward, VConv2d.forward)


_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward, calls.SyncBatchNorm.forward,
                VBatchNorm2d.forward)


def _bn_module(m) -> bool:
    return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, calls.SyncBatchNorm)) and type(m).forward in _BN_FORWARDS


def is_leaf_module(m: nn.Module) -> bool:
    """Modules the rewrite treats as one node: convs and BatchNorms it may fuse, LRN."""
    return _conv_module(m) or _bn_module(m) or type(m) is nn.LocalResponseNorm


def _args(node: fx.Node, names: tuple, defaults: tuple) -> list:
    """``node``'s arguments by position or keyword, with ``defaults`` for the trailing ones."""
    values = list(node.args) + [None] * (len(names) - len(node.args))
    first_default = len(names) - len(defaults)
    for i, name in enumerate(names):
        if i >= len(node.args):
            values[i] = node.kwargs.get(name, defaults[i - first_default] if i >= first_default else None)
    return values


@dataclass
class _Conv:
    """A matched conv: its input node, weight and bias (nodes, or module attributes),
    geometry constants, and where it came from."""

    node: fx.Node
    input: fx.Node
    weight: object
    bias: object
    geometry: tuple  # (stride, padding, dilation, groups)
    module: Optional[nn.Module]
    name: str


def _const(x) -> bool:
    return not isinstance(x, fx.Node) and not (isinstance(x, (tuple, list)) and any(isinstance(v, fx.Node) for v in x))


def _match_conv(node: fx.Node, modules: dict, records: dict) -> Optional[_Conv]:
    if node.op == "call_module" and _conv_module(modules.get(node.target)):
        m = modules[node.target]
        record = records.setdefault(node, ConvRecord(node.target, node=node.name))
        if len(node.args) != 1 or node.kwargs:
            record.notes.append("not converted: called with extra arguments")
            return None
        if m.padding_mode != "zeros":
            record.notes.append(f"not converted: padding_mode={m.padding_mode!r}")
            return None
        return _Conv(node, node.args[0], f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None,
                     (m.stride, m.padding, m.dilation, m.groups), m, node.target)
    if node.op == "call_function" and node.target in _CONV_FUNCTIONS:
        x, w, b, stride, padding, dilation, groups = _args(
            node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), (None, 1, 0, 1, 1))
        record = records.setdefault(node, ConvRecord(_functional_name(node), node=node.name))
        geometry = (stride, padding, dilation, groups)
        if not all(_const(v) for v in geometry) or not isinstance(x, fx.Node) or not isinstance(w, fx.Node):
            record.notes.append("not converted: geometry computed at run time")
            return None
        return _Conv(node, x, w, b, geometry, None, record.name)
    return None


def _functional_name(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    where = next(reversed(stack.values()))[0] if stack else ""
    return f"{where + ':' if where else ''}{node.name}"


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


@dataclass
class _BN:
    node: fx.Node
    module: Optional[nn.Module]
    args: tuple  # functional: (weight, bias, running_mean, running_var, training, momentum, eps)


def _match_bn(node: Optional[fx.Node], producer: fx.Node, modules: dict) -> Optional[_BN]:
    if node is None:
        return None
    if node.op == "call_module" and _bn_module(modules.get(node.target)):
        if node.args == (producer,) and not node.kwargs:
            return _BN(node, modules[node.target], ())
        return None
    if node.op == "call_function" and node.target in _BN_FUNCTIONS:
        x, rm, rv, w, b, training, momentum, eps = _args(
            node, ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
            (None, None, False, 0.1, 1e-5))
        if x is producer and all(_const(v) for v in (training, momentum, eps)) and momentum is not None:
            return _BN(node, None, (w, b, rm, rv, bool(training), float(momentum), float(eps)))
    return None


def _match_act(node: Optional[fx.Node], producer: fx.Node, modules: dict, record: ConvRecord) -> Optional[Activation]:
    if node is None or not node.args or node.args[0] is not producer:
        return None
    act = activation_of(node, modules)
    if act is not None and not act.supported:
        record.notes.append(f"activation {act.label()} unsupported by vhist's kernels (runs as PyTorch's)")
        return None
    return act


def _attr(graph: fx.Graph, value):
    return graph.get_attr(value) if isinstance(value, str) else value


def rewrite(graph: fx.Graph, modules: dict, *, defer: bool = False) -> list[ConvRecord]:
    """Rewrites ``graph`` in place; returns a record per conv, in graph order.

    Args:
        graph: a traced graph; ``call_module`` targets are looked up in ``modules``.
        modules: qualified name -> module of the traced root (``named_modules()``).
        defer: hand a conv + BN + activation, or a BN + activation of a concatenation,
            whose output only dense fused convs consume to their prologue
            (:func:`vhist.convert.calls.conv_bn`'s ``defer``, :func:`~vhist.convert.calls.bn_act`). Eager
            graphs only: a :class:`~vhist.ops.DeferredBNAct` is no graph value Dynamo's
            backends can carry.
    """
    records: dict = {}
    for node in list(graph.nodes):
        if node.op == "call_module" and type(modules.get(node.target)) is nn.Identity and len(node.args) == 1:
            # timm's BatchNormAct2d has an nn.Identity (its dropout) between BN and activation.
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.graph is not graph or node.op == "output":
            continue
        if node.op == "call_function" and node.target in _CALL_LABELS:
            _record_converted(node, records)
            continue
        if (node.op == "call_module" and type(modules.get(node.target)) is nn.LocalResponseNorm) or (
                node.op == "call_function" and node.target in _LRN_FUNCTIONS):
            _rewrite_lrn(graph, node, modules)
            continue
        conv = _match_conv(node, modules, records)
        if conv is not None:
            _rewrite_chain(graph, conv, modules, records[node])
    if defer:
        if calls.has_layer_orders():
            _rewrite_bn_act_prologues(graph, modules, records)
        _defer_to_prologues(graph, modules, records)
    return list(records.values())


_FUSED = (calls.conv_bn, calls.conv_bn_module)
_DEFERRED = " (BN+act in the next conv's prologue)"


def _dense_fused_consumer(node: fx.Node, producer: fx.Node, modules: dict) -> bool:
    """Whether ``node`` is a fused dense conv + BN taking ``producer`` as its input only."""
    if node.op != "call_function" or node.target not in _FUSED or node.args[0] is not producer:
        return False
    if any(a is producer for a in list(node.args[1:]) + list(node.kwargs.values())):
        return False
    if node.args[6] != 1:  # groups: a depthwise or grouped conv's path has no prologue
        return False
    if node.target is calls.conv_bn_module:
        bn = _target_module(node.args[7], modules)
        return bn is not None and not isinstance(bn, calls.SYNC_BATCH_NORMS)
    return True


def _target_module(node, modules: dict):
    return modules.get(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _defer_to_prologues(graph: fx.Graph, modules: dict, records: dict) -> None:
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _FUSED or node.args[6] != 1:
            continue
        if node.kwargs.get("residual") is not None or not node.users:
            continue
        if node.target is calls.conv_bn_module and not _dense_fused_consumer_bn(node, modules):
            continue
        if all(_dense_fused_consumer(user, node, modules) for user in node.users):
            node.kwargs = {**node.kwargs, "defer": True}
            record = records.get(node.meta.get("vhist_conv"))
            if record is not None:
                record.fused += _DEFERRED


def _dense_fused_consumer_bn(node: fx.Node, modules: dict) -> bool:
    bn = _target_module(node.args[7], modules)
    return bn is not None and not isinstance(bn, calls.SYNC_BATCH_NORMS)


def _record_converted(node: fx.Node, records: dict) -> None:
    """A call a previous conversion wrote (converting twice changes nothing more)."""
    record = records.setdefault(node, ConvRecord(_functional_name(node), on_vhist=True, node=node.name))
    label = [_CALL_LABELS[node.target].replace("conv+", "").replace("conv", "")]
    act = node.kwargs.get("activation")
    label += [act] if act else []
    label += ["residual"] if node.kwargs.get("residual") is not None else []
    record.fused = "+".join(v for v in label if v) + (_DEFERRED if node.kwargs.get("defer") else "")


def _rewrite_lrn(graph: fx.Graph, node: fx.Node, modules: dict) -> None:
    if node.op == "call_module":
        m = modules[node.target]
        if node.kwargs or len(node.args) != 1:
            return
        x, size, alpha, beta, k = node.args[0], m.size, m.alpha, m.beta, m.k
    else:
        x, size, alpha, beta, k = _args(node, ("input", "size", "alpha", "beta", "k"), (1e-4, 0.75, 1.0))
    if not all(_const(v) for v in (size, alpha, beta, k)) or not (k > 0 and alpha >= 0):
        return  # the kernels need a positive base (see vhist.ops.local_response_norm)
    with graph.inserting_before(node):
        new = graph.call_function(calls.local_response_norm, (x, size, alpha, beta, k))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _rewrite_chain(graph: fx.Graph, conv: _Conv, modules: dict, record: ConvRecord) -> None:
    """conv [-> BN] [-> + residual] [-> activation], each step taken when the previous
    node's only user is it. The fused call takes the place of the chain's last node, so
    the chain stops before a node that would move the conv past an in-place write to
    its input."""
    if _rewrite_conv_act_bn(graph, conv, modules, record):
        return
    chain, last = [conv.node], conv.node
    bn = _match_bn(_only_user(last), last, modules)
    if bn is not None and _written_between(conv.node, bn.node, conv.input, modules):
        bn = None
    sync = bn is not None and bn.module is not None and isinstance(bn.module, calls.SYNC_BATCH_NORMS)
    if bn is not None:
        if conv.bias is not None and _depthwise_module(conv):
            record.notes.append("BN not fused: a depthwise conv with a bias before BatchNorm")
            bn = None
        else:
            chain.append(bn.node)
            last = bn.node
    residual = None
    add = _only_user(last)
    can_add = not sync and not (bn is not None and conv.bias is not None)
    if add is not None and _written_between(conv.node, add, conv.input, modules):
        can_add = False
    if can_add and add is not None and is_add(add) and last in add.args:
        other = add.args[1] if add.args[0] is last else add.args[0]
        if other is not last:
            residual = other
            chain.append(add)
            last = add
    act_node = _only_user(last)
    act = None if sync or (act_node is not None and _written_between(conv.node, act_node, conv.input, modules)) \
        else _match_act(act_node, last, modules, record)
    if act is not None:
        chain.append(_only_user(last))
        last = chain[-1]
    if sync:
        record.notes.append("SyncBatchNorm runs unfused (its statistics are exchanged between processes)")
    kwargs = {}
    if act is not None:
        kwargs["activation"] = act.name
        if act.kwargs:
            kwargs["act_kwargs"] = dict(act.kwargs)
    if residual is not None:
        kwargs["residual"] = residual
    _replace_chain(graph, conv, bn, chain, kwargs, (calls.conv, calls.conv_bn_module, calls.conv_bn))
    record.on_vhist = True
    record.fused = "+".join((["BN"] if bn is not None else []) + ([act.label()] if act else [])
                            + (["residual"] if residual is not None else []))


def _replace_chain(graph: fx.Graph, conv: _Conv, bn: Optional[_BN], chain: list, kwargs: dict, targets: tuple):
    """Replaces the nodes of ``chain`` (conv first, in graph order) by one call at the
    last one's place: ``targets`` is (without BN, with a BN module, with a functional BN)."""
    plain, with_module, with_functional = targets
    last = chain[-1]
    with graph.inserting_before(last):
        head = (conv.input, _attr(graph, conv.weight), _attr(graph, conv.bias), *conv.geometry)
        if bn is None:
            new = graph.call_function(plain, head, kwargs)
        elif bn.module is not None:
            new = graph.call_function(with_module, head + (graph.get_attr(bn.node.target),), kwargs)
        else:
            new = graph.call_function(with_functional, head + bn.args, kwargs)
    new.meta = dict(conv.node.meta)
    new.meta["vhist_conv"] = conv.node
    last.replace_all_uses_with(new)
    for node in reversed(chain):
        graph.erase_node(node)


def _rewrite_conv_act_bn(graph: fx.Graph, conv: _Conv, modules: dict, record: ConvRecord) -> bool:
    """conv -> activation -> BN (ConvMixer) as one :func:`vhist.convert.calls.conv_act_bn`,
    when vhist's ops have that order; False where the chain is not this one."""
    act_node = _only_user(conv.node)
    if act_node is None or not calls.has_layer_orders():
        return False
    act = activation_of(act_node, modules) if act_node.args and act_node.args[0] is conv.node else None
    if act is None or not act.supported:
        return False
    bn = _match_bn(_only_user(act_node), act_node, modules)
    if bn is None or (bn.module is not None and isinstance(bn.module, calls.SYNC_BATCH_NORMS)):
        return False
    if _written_between(conv.node, bn.node, conv.input, modules):
        return False
    kwargs = {"activation": act.name, **({"act_kwargs": dict(act.kwargs)} if act.kwargs else {})}
    _replace_chain(graph, conv, bn, [conv.node, act_node, bn.node], kwargs,
                   (None, calls.conv_act_bn_module, calls.conv_act_bn))
    record.on_vhist = True
    record.fused = f"{act.label()}+BN"
    return True


def _rewrite_bn_act_prologues(graph: fx.Graph, modules: dict, records: dict) -> None:
    """BN -> activation whose output only dense fused convs consume, on a tensor that is
    no conv's output (DenseNet's concatenation): one
    :func:`vhist.convert.calls.bn_act`, applied in the consumers' prologue."""
    for node in list(graph.nodes):
        if node.graph is not graph or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        bn = _match_bn(node, node.args[0], modules)
        if bn is None or (bn.module is not None and isinstance(bn.module, calls.SYNC_BATCH_NORMS)):
            continue
        out, act = node, None
        user = _only_user(node)
        if user is not None and user.args and user.args[0] is node:
            act = activation_of(user, modules)
            if act is not None and act.supported:
                out = user
            else:
                act = None
        consumers = list(out.users)
        if not consumers or not all(_dense_fused_consumer(c, out, modules) for c in consumers):
            continue
        kwargs = {"activation": act.name if act else None,
                  **({"act_kwargs": dict(act.kwargs)} if act and act.kwargs else {})}
        with graph.inserting_before(out):
            if bn.module is not None:
                new = graph.call_function(calls.bn_act_module, (node.args[0], graph.get_attr(node.target)), kwargs)
            else:
                new = graph.call_function(calls.bn_act, (node.args[0],) + bn.args, kwargs)
        out.replace_all_uses_with(new)
        for dead in ([out, node] if out is not node else [node]):
            graph.erase_node(dead)
        label = "BN" + (f"+{act.label()}" if act else "")
        for consumer in consumers:
            record = records.get(consumer.meta.get("vhist_conv"))
            if record is not None:
                record.notes.append(f"its input's {label} runs in its prologue")


def _in_place(node: fx.Node, modules: dict) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return getattr(modules.get(node.target), "inplace", False) is True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__") or (name.startswith("__i") and name.endswith("__"))


def _written_between(start: fx.Node, end: fx.Node, value: fx.Node, modules: dict) -> bool:
    """Whether a node after ``start`` and before ``end`` writes ``value`` in place."""
    node = start.next
    while node is not end and node.op != "root":
        if node.args and node.args[0] is value and _in_place(node, modules):
            return True
        node = node.next
    return False


def _depthwise_module(conv: _Conv) -> bool:
    m = conv.module
    return m is not None and m.groups > 1 and m.groups == m.in_channels and m.out_channels % m.in_channels == 0


__all__ = ["ConvRecord", "is_leaf_module", "rewrite"]
