"""``vhist.convert(model)``: trace, rewrite, and give the model a forward that runs the
rewritten graph.

The model object keeps its class, submodules, parameters, buffers and their names: only
the ``forward`` of each traced module is replaced, by an instance attribute that runs
the rewritten code over the module's own submodules (so ``state_dict`` keys, shapes and
values are the original's, and strict loading works both ways). A module whose code
branches on ``self.training`` is traced in both modes and its forward picks the graph of
the mode it is in. A module that does not trace whole (data-dependent control flow) is
converted child by child. Modules of vhist itself (the zoo, :mod:`vhist.nn`) already run
on vhist and are left alone. Nothing outside the model passed in changes.
"""
from __future__ import annotations

import copy
import itertools
import linecache
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from vhist.convert import calls
from vhist.convert.rewrite import ConvRecord, is_leaf_module, rewrite

_COUNTER = itertools.count()


def _is_vhist_own(m: nn.Module) -> bool:
    module = type(m).__module__
    return module.startswith("vhist.") and not module.startswith("vhist.convert")


class _Tracer(fx.Tracer):
    """torch.fx's tracer with the rewrite's leaves (convs, BatchNorms, LRN, vhist's own
    modules) and the calls a previous conversion wrote kept whole."""

    def __init__(self):
        super().__init__(autowrap_functions=calls.CALLS)
        # Buffers as graph values: forward code that updates one (timm's BatchNormAct2d
        # counts num_batches_tracked itself) must do so at run time, not once while tracing.
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_leaf_module(m) or _is_vhist_own(m) or super().is_leaf_module(m, qualname)


@dataclass
class ConversionReport:
    """What :func:`convert` did, per conv, and the share of conv multiply-adds on vhist.

    Attributes:
        convs: one :class:`~vhist.convert.rewrite.ConvRecord` per conv found.
        untraced: ``(module, reason)`` for each module that did not trace whole (its
            children were converted one by one).
        input_size: the input (C, H, W) the multiply-adds were counted at, or None.
    """

    convs: list = field(default_factory=list)
    untraced: list = field(default_factory=list)
    input_size: Optional[tuple] = None

    @property
    def macs(self) -> int:
        return sum(r.macs or 0 for r in self.convs)

    @property
    def vhist_macs(self) -> int:
        return sum(r.macs or 0 for r in self.convs if r.on_vhist)

    @property
    def share(self) -> Optional[float]:
        """Share of the conv multiply-adds that run on vhist (None if none were counted)."""
        return self.vhist_macs / self.macs if self.macs else None

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.convs] + [4])
        lines = [f"{'conv':<{width}}  {'MMACs':>9}  on vhist  fused / why not"]
        for r in self.convs:
            macs = f"{r.macs / 1e6:9.2f}" if r.macs is not None else f"{'n/a':>9}"
            why = "; ".join(r.notes)
            if r.on_vhist:
                what = "conv" + (f"+{r.fused}" if r.fused else "") + (f" ({why})" if why else "")
            else:
                what = why or "not converted"
            lines.append(f"{r.name:<{width}}  {macs}  {'yes' if r.on_vhist else 'no':<8}  {what}")
        for name, reason in self.untraced:
            lines.append(f"module {name} does not trace whole (converted child by child): {reason}")
        size = "x".join(map(str, self.input_size)) if self.input_size else "?"
        share = f"{100 * self.share:.1f}%" if self.share is not None else "n/a"
        lines.append(f"conv multiply-adds on vhist at input {size}: {share} "
                     f"({self.vhist_macs / 1e6:.2f} of {self.macs / 1e6:.2f} MMACs; {len(self.convs)} convs, "
                     f"{sum(r.on_vhist for r in self.convs)} on vhist)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- forward code


def _define(src: str, scope: dict, tag: str):
    """``forward`` defined by ``src`` in ``scope``, its source kept for tracebacks."""
    filename = f"<vhist.convert:{tag}:{next(_COUNTER)}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    exec(compile(src, filename, "exec"), scope)  # noqa: S102  (code fx generated from the model)
    return scope["forward"]


def _forward_from_graph(graph: fx.Graph, tag: str):
    code = graph.python_code(root_module="self")
    return _define(code.src, dict(code.globals), tag)


def _dispatcher(train_forward, eval_forward, tag: str):
    """A forward that runs the graph of the module's mode."""
    src = ("def forward(self, *args, **kwargs):\n    if self.training:\n"
           "        return train_forward(self, *args, **kwargs)\n    return eval_forward(self, *args, **kwargs)\n")
    return _define(src, {"train_forward": train_forward, "eval_forward": eval_forward}, tag)


def _trace_both_modes(module: nn.Module) -> tuple[fx.Graph, fx.Graph]:
    """The graphs of ``module`` in training and in eval (the modes restored after)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        graphs = []
        for mode in (True, False):
            module.train(mode)
            graphs.append(_Tracer().trace(module))
        return graphs[0], graphs[1]
    finally:
        for m, mode in modes:
            m.training = mode


# ----------------------------------------------------------------------------- multiply-adds


def _example_inputs(model: nn.Module, input_size: tuple) -> dict:
    """The arguments each submodule is called with on one zero image of ``input_size``
    (eval, no grad), or {} if the model does not run on it. A conv module's
    multiply-adds per image are stored under ``(conv, "macs")`` (for convs that stay
    PyTorch's, which no traced graph counts)."""
    seen: dict = {}
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    x = torch.zeros((1, *input_size), dtype=first.dtype if first is not None and first.is_floating_point()
                    else torch.float32, device=first.device if first is not None else "cpu")

    def hook(m, args, kwargs):
        seen.setdefault(m, (args, kwargs))

    def conv_hook(m, args, output):
        w = m.weight.shape
        seen.setdefault((m, "macs"), int(output[0].numel() * w[1] * w[2] * w[3]))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
    handles += [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except Exception:  # noqa: BLE001  (the report then has no multiply-adds; conversion goes on)
        return {}
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return seen


def _count_macs(module: nn.Module, graph: fx.Graph, example) -> None:
    """Runs ``graph`` on ``module``'s example (eval, no grad) and stores each conv node's
    multiply-adds per image in ``node.meta["vhist_macs"]``."""
    args, kwargs = example
    if kwargs:
        return
    gm = fx.GraphModule(module, graph)
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception:  # noqa: BLE001  (multiply-adds unknown for this graph)
        return
    finally:
        for m, mode in modes:
            m.training = mode
    modules = dict(module.named_modules())
    for node in graph.nodes:
        meta = node.meta.get("tensor_meta")
        weight = None
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.Conv2d):
            weight = modules[node.target].weight.shape
        elif node.op == "call_function" and node.target in (torch.nn.functional.conv2d, torch.conv2d):
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            weight = w.meta["tensor_meta"].shape if isinstance(w, fx.Node) and "tensor_meta" in w.meta else None
        if weight is not None and meta is not None:
            out = meta.shape
            node.meta["vhist_macs"] = int(torch.Size(out[1:]).numel() * weight[1] * weight[2] * weight[3])


# ----------------------------------------------------------------------------- conversion


def _convert_module(module: nn.Module, qualname: str, report: ConversionReport, examples: dict) -> None:
    if _is_vhist_own(module):
        for name, m in module.named_modules(prefix=qualname):
            if isinstance(m, nn.Conv2d):
                report.convs.append(ConvRecord(name, on_vhist=True, notes=["a vhist.nn model: already on vhist"]))
        return
    try:
        train_graph, eval_graph = _trace_both_modes(module)
    except Exception as exc:  # noqa: BLE001  (the children are tried one by one)
        reason = " ".join(str(exc).split())[:160]
        if isinstance(module, nn.Conv2d):
            report.convs.append(ConvRecord(qualname or type(module).__name__, examples.get((module, "macs")),
                                           notes=[f"not converted: its forward does not trace ({reason})"]))
        elif any(True for _ in module.children()):
            report.untraced.append((qualname or type(module).__name__, reason))
        for name, child in module.named_children():
            _convert_module(child, f"{qualname}.{name}" if qualname else name, report, examples)
        return
    if module in examples:
        _count_macs(module, train_graph, examples[module])
    modules = dict(module.named_modules())
    before = (train_graph.python_code("self").src, eval_graph.python_code("self").src)
    macs = {n.name: n.meta.get("vhist_macs") for n in train_graph.nodes}
    records = rewrite(train_graph, modules, defer=True)
    rewrite(eval_graph, modules, defer=True)
    for record in records:
        record.macs = macs.get(record.node)
        if isinstance(module, nn.Conv2d) and len(records) == 1:
            record.name = qualname or type(module).__name__  # a conv module converted on its own
        else:
            record.name = f"{qualname}.{record.name}" if qualname else record.name
    report.convs.extend(records)
    after = (train_graph.python_code("self").src, eval_graph.python_code("self").src)
    if after == before:
        return
    tag = qualname or type(module).__name__
    train_forward = _forward_from_graph(train_graph, tag)
    if after[0] == after[1]:
        forward = train_forward
    else:
        forward = _dispatcher(train_forward, _forward_from_graph(eval_graph, tag), tag)
    module.forward = forward.__get__(module)


def _input_size(model: nn.Module, input_size) -> Optional[tuple]:
    if input_size is None:
        config = getattr(model, "default_config", None)
        input_size = getattr(config, "image_size", None) or 224
    if isinstance(input_size, int):
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = first.in_channels if first is not None else 3
        return (channels, input_size, input_size)
    return tuple(input_size)


def convert(model: nn.Module, *, inplace: bool = False, report: bool = False,
            input_size=None) -> nn.Module:
    """Runs ``model``'s convs (with the BatchNorm, residual add and activation that follow
    them in its dataflow) and LocalResponseNorms on vhist's kernels.

    The model is traced with torch.fx and each conv -> BatchNorm -> residual add ->
    activation chain (every step optional; ``nn.Conv2d`` or ``F.conv2d`` with a computed
    weight; modules, functions or methods, in place or not) becomes one call of vhist's
    fused ops, whatever module wrote each step. Everything else runs as before. A model
    that does not trace whole is converted submodule by submodule; nothing unsupported
    raises (the report says what was left and why). Parameter and buffer names, the
    module tree, ``train()`` / ``eval()`` and BatchNorm's statistics rules are PyTorch's;
    a SyncBatchNorm stays synchronized (it runs unfused). Converting a converted model
    changes nothing more.

    Args:
        model: the model; with ``inplace=False`` a deep copy is converted.
        inplace: convert ``model`` itself.
        report: print, per conv, whether it runs on vhist's kernels (and fused with what,
            or why not), and the share of conv multiply-adds on vhist.
        input_size: the image size (int) or (C, H, W) the report counts multiply-adds at
            (default: the model's ``default_config.image_size``, else 224).

    Returns:
        The converted model (``model`` itself with ``inplace=True``).
    """
    model, _ = convert_with_report(model, inplace=inplace, input_size=input_size, count_macs=report)
    if report:
        print(_)
    return model


def convert_with_report(model: nn.Module, *, inplace: bool = False, input_size=None,
                        count_macs: bool = True) -> tuple[nn.Module, ConversionReport]:
    """:func:`convert`, returning ``(model, ConversionReport)`` instead of printing."""
    if not inplace:
        model = copy.deepcopy(model)
    size = _input_size(model, input_size)
    result = ConversionReport(input_size=size if count_macs else None)
    # Counting runs the model and the training graphs (no grad): their buffer updates
    # (running statistics, num_batches_tracked written in forward code) are undone.
    saved = [(b, b.clone()) for b in model.buffers()] if count_macs else []
    try:
        examples = _example_inputs(model, size) if count_macs else {}
        _convert_module(model, "", result, examples)
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    return model, result


__all__ = ["ConversionReport", "convert", "convert_with_report"]
