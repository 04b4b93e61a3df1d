"""Export of a trained model to ONNX or a ``torch.export`` ExportedProgram (``vhist
export``): the eval model traced on the torch backend, so the graph holds standard ATen
ops only and runs without vhist, with every eval BatchNorm that follows a conv folded
into that conv's weight and bias (:func:`fold_batch_norms`). The exported model's logits
are checked against vhist's on sample inputs before the export counts as done.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import fx, nn

FORMATS = {"onnx": ".onnx", "exported-program": ".pt2"}
# Folding BN changes the rounding of each conv: fp32 logits then differ at the 1e-5
# relative level; a wrong graph differs at order 1.
ATOL, RTOL = 1e-4, 1e-4


def _attr(gm: fx.GraphModule, node) -> Optional[torch.Tensor]:
    """The tensor a ``get_attr`` node reads (None for None); LookupError for anything
    computed, which cannot be folded ahead of time."""
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise LookupError(node)
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def fold_batch_norms(gm: fx.GraphModule) -> tuple[int, int]:
    """Folds every eval ``aten.batch_norm`` whose input is an ``aten.conv2d`` used by
    nothing else into that conv (``w * s``, ``beta + (b - mean) * s`` with ``s = gamma /
    sqrt(var + eps)``: :func:`vhist.ops.conv_common.fold_bn`), in the unlifted graph of
    an ExportedProgram. Returns (folded, left) counts of batch_norm nodes."""
    from vhist.ops.conv_common import fold_bn

    aten = torch.ops.aten
    folded = left = 0
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target is not aten.batch_norm.default:
            continue
        conv = bn.args[0]
        try:
            if conv.op != "call_function" or conv.target is not aten.conv2d.default or len(conv.users) != 1 \
                    or bn.args[5]:
                raise LookupError
            weight = _attr(gm, conv.args[1])
            conv_bias = _attr(gm, conv.args[2] if len(conv.args) > 2 else None)
            gamma, beta, mean, var = (_attr(gm, a) for a in bn.args[1:5])
        except LookupError:
            left += 1
            continue
        with torch.no_grad():
            new_weight, new_bias = fold_bn(weight, gamma, beta, mean, var, bn.args[7], conv_bias)
        names = []
        for kind, tensor in (("weight", new_weight), ("bias", new_bias)):
            name = f"folded_{folded}_{kind}"
            gm.register_buffer(name, tensor.detach().clone())
            names.append(name)
        with gm.graph.inserting_before(conv):
            w_node, b_node = (gm.graph.get_attr(n) for n in names)
        rest = list(conv.args[3:]) or [[1, 1], [0, 0], [1, 1], 1]
        conv.args = (conv.args[0], w_node, b_node, *rest)
        bn.replace_all_uses_with(conv)
        gm.graph.erase_node(bn)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return folded, left


def trace_eval_model(model: nn.Module, batch: int, image_size: int, dynamic_batch: bool = False):
    """The ExportedProgram of ``model`` in eval mode on the torch backend, BN folded.
    Returns (program, (folded, left) BN counts)."""
    from vhist.backend import use_backend

    model = model.eval()
    example = (torch.randn(batch, 3, image_size, image_size),)
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with use_backend("torch"), torch.no_grad():
        program = torch.export.export(model, example, dynamic_shapes=shapes)
        gm = program.module()
        counts = fold_batch_norms(gm)
        program = torch.export.export(gm, example, dynamic_shapes=shapes)
    return program, counts


def reference_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from vhist.backend import use_backend

    with use_backend("torch"), torch.no_grad():
        return model.eval()(x)


def check_logits(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Max abs difference; ValueError when past the tolerance (module constants)."""
    diff = (ours - theirs).abs()
    err = diff.max().item()
    if not torch.allclose(theirs, ours, atol=ATOL, rtol=RTOL):
        raise ValueError(f"the exported {name} model's logits differ from vhist's by up to {err:.3e} "
                         f"(tolerance {ATOL:g} + {RTOL:g} x |logit|); not exporting")
    return err


def run_onnx(path: str | Path, x: torch.Tensor) -> torch.Tensor:
    """Logits of the ONNX model at ``path`` for ``x``, run in ONNX Runtime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def export_model(model: nn.Module, fmt: str, out: str | Path, batch: int = 1, image_size: int = 224,
                 dynamic_batch: bool = False, seed: int = 0) -> dict:
    """Writes ``model`` (eval, BN folded, standard ops) to ``out`` in ``fmt`` and checks
    the written model's logits against vhist's on sample inputs (the export batch, and
    another batch size with ``dynamic_batch``); a file that fails the check is removed.
    ``model`` itself is moved to the CPU in fp32 and set to eval. Returns what was done.

    Raises:
        ValueError: an unknown format, a missing exporter, or logits that differ.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as exc:
            raise ValueError(f"ONNX export needs onnx, onnxscript and onnxruntime ({exc}); "
                             "pip install 'vhist[export]'") from None
    model = model.cpu().float().eval()
    program, (folded, left) = trace_eval_model(model, batch, image_size, dynamic_batch)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        # No onnxscript optimization pass: BN is folded already, and ONNX Runtime runs its
        # own graph optimizations (constant folding, fusions) when it loads the model;
        # the pass would double the export time.
        torch.onnx.export(program, (), str(out), dynamo=True, optimize=False, verbose=False, external_data=False)
    else:
        torch.export.save(program, str(out))
    generator = torch.Generator().manual_seed(seed)
    batches = [batch] + ([batch + 2] if dynamic_batch else [])
    errors = []
    try:
        for n in batches:
            x = torch.randn(n, 3, image_size, image_size, generator=generator)
            theirs = reference_logits(model, x)
            ours = run_onnx(out, x) if fmt == "onnx" else torch.export.load(str(out)).module()(x)
            errors.append(check_logits(fmt, ours, theirs))
    except ValueError:
        out.unlink()
        raise
    return {"out": str(out), "format": fmt, "batch": batch, "dynamic_batch": dynamic_batch,
            "image_size": image_size, "bn_folded": folded, "bn_left": left, "checked_batches": batches,
            "max_abs_diff": max(errors)}


def _run_export(args) -> int:
    from vhist.train import checkpoint as ckpt

    if args.format not in FORMATS:  # before the checkpoint is read: the cheaper error first
        raise ValueError(f"unknown export format {args.format!r}; choose from {', '.join(FORMATS)}")
    state = ckpt.load(args.checkpoint)
    model = ckpt.build_model(state)
    out = args.out or str(Path(args.checkpoint).with_suffix(FORMATS[args.format]))
    done = export_model(model, args.format, out, args.batch, state["image_size"], args.dynamic_batch)
    runner = "ONNX Runtime (CPU)" if args.format == "onnx" else "torch.export.load"
    print(f"exported {state['train_config']['model']} ({done['image_size']} px, batch "
          f"{'dynamic' if args.dynamic_batch else args.batch}, {done['bn_folded']} BatchNorms folded"
          f"{', ' + str(done['bn_left']) + ' left' if done['bn_left'] else ''}) to {done['out']}; {runner} "
          f"reproduces vhist's logits on batches of {', '.join(map(str, done['checked_batches']))} "
          f"(max abs diff {done['max_abs_diff']:.2e})")
    return 0


def add_export_parser(commands):
    """``vhist export --checkpoint FILE --format onnx|exported-program [--out FILE] ...``."""
    p = commands.add_parser("export", help="export a trained model to ONNX or a torch.export program",
                            description="Export a checkpoint's eval model (BatchNorm folded into the convs, "
                                        "standard ops only, so ONNX Runtime or any torch.export consumer runs it "
                                        "without vhist) and check its logits against vhist's before reporting "
                                        "success.")
    p.add_argument("--checkpoint", required=True, help="a best.pt / last.pt written by vhist train")
    p.add_argument("--format", required=True, metavar="FORMAT", help=f"{' or '.join(FORMATS)}")
    p.add_argument("--out", default=None,
                   help="output file (default: the checkpoint's path with .onnx or .pt2)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the traced input (default: 1)")
    p.add_argument("--dynamic-batch", action="store_true", help="let the batch dimension vary")
    p.set_defaults(run=_run_export)
    return p
