"""Dense conv2d and the fused conv + BatchNorm + activation op.

Backends: ``triton`` (the implicit-GEMM kernels of :mod:`vhist.kernels.conv`, with the
BatchNorm kernels of :mod:`vhist.kernels.batch_norm` for the statistics merge and the
elementwise passes) and ``torch`` (the reference composition).

Registered custom ops (each with a fake implementation, so ``torch.compile`` traces them):

* ``vhist::conv2d_fwd`` / ``vhist::conv2d_bwd``: conv with bias, residual and activation
  epilogue (any activation of :data:`~vhist.ops.common.ACTIVATION_CODES`); the backward
  multiplies dy by the activation's derivative on the fly inside dgrad and wgrad, read
  off the saved output for ReLU / ReLU6 and off the saved pre-activation (the forward's
  second output) for the others; wgrad is split-K with partial buffers.
* ``vhist::fused_conv_bn_relu_fwd`` / ``_bwd`` (the op :func:`fused_conv_bn_act`, also
  :func:`fused_conv_bn_relu`): the scaffold of :mod:`vhist.ops.fused_bn` on this file's
  passes. Training: the conv epilogue writes the conv output and per-tile BN partials
  (count, mean, M2) from a config fixed by the shape (:func:`stats_config`, so the bits
  do not depend on autotuning), merged by ``bn_fwd_finalize``, then one ``bn_fwd_apply`` pass;
  backward through BatchNorm's reduce/dx kernels, then dgrad and wgrad on dy_conv.
  Eval folds BN into the weight and a bias on the fly (autograd flows through the fold)
  and runs one ``conv2d_fwd`` launch with bias, residual and activation in the epilogue.

Stem convs (at most 4 input channels, :func:`is_stem`) run the forward on channels
zero-padded to 16 once per call (:func:`pad_channels`), so that activation rows are
16-byte aligned.

Activations are NCHW or channels_last; NCHW inputs are converted once at the op
boundary, and outputs are channels_last. Under autocast the conv's tensors are cast to
the autocast dtype, as ``F.conv2d`` does.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from vhist import reference
from vhist.ops import heuristics
from vhist.ops._dispatch import autocast_inputs, check_float_dtype, check_same_device, dispatch
from vhist.ops.common import cdiv
from vhist.ops.common import (ACTIVATION_CODES, DEFAULT_NEGATIVE_SLOPE, OUTPUT_GRAD_CODES, acc_dtype,
                              activation_code, activation_constexprs, activation_grad, channels_innermost,
                              channels_last_strides, check_negative_slope, cudnn_allow_tf32, empty_4d,
                              kernel_slope, like_layout, op_outputs, or_placeholder, partial_buffers, tl_acc,
                              to_channels_last)
from vhist.ops.conv_common import ConvGeometryBase, check_residual, op_lists_key, positive_pair, resolve_padding
from vhist.ops.fused_bn import ConvPasses, check_fused_args, define_fused_ops, run_fused_triton
from vhist.ops.launch_cache import Launch, lookup, new_cache, scratch, shape_cached
from vhist.ops.op_call import custom_op

if TYPE_CHECKING:
    import triton

OP = "conv2d"
FUSED_OP = "fused_conv_bn_act"


# ----------------------------------------------------------------------------- geometry and checks


@dataclass(frozen=True)
class ConvGeometry(ConvGeometryBase):
    """A dense (grouped) conv's sizes: :class:`ConvGeometryBase` plus the groups."""

    groups: int = 1

    def flops(self) -> int:
        """Multiply-adds x 2 of the forward."""
        return 2 * self.positions * self.c_out * (self.c_in // self.groups) * self.kh * self.kw


@shape_cached
def conv_geometry(op, input_shape, weight_shape, stride, padding, dilation, groups) -> ConvGeometry:
    """Validates a conv's hyper-parameters against the shapes; raises a clear error for
    what ``F.conv2d`` rejects. Cached per argument tuple (:mod:`vhist.ops.launch_cache`)."""
    n, c_in, h, w = input_shape
    c_out, cg_in, kh, kw = weight_shape
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    if c_in % groups or c_out % groups:
        raise ValueError(f"{op}: in_channels ({c_in}) and out_channels ({c_out}) must both be "
                         f"divisible by groups ({groups})")
    if cg_in * groups != c_in:
        raise ValueError(f"{op}: weight of shape {tuple(weight_shape)} with groups={groups} expects "
                         f"{cg_in * groups} input channels, but the input has {c_in}")
    stride, dilation = positive_pair(op, "stride", stride), positive_pair(op, "dilation", dilation)
    pads = resolve_padding(op, padding, stride, dilation, kh, kw)
    geom = ConvGeometry(n, c_in, h, w, c_out, kh, kw, stride, pads, dilation, groups)
    eff_h, eff_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    if eff_h > h + pads[0] + pads[1] or eff_w > w + pads[2] + pads[3]:
        raise ValueError(f"{op}: the (dilated) kernel ({eff_h}x{eff_w}) is larger than the padded input "
                         f"({h + pads[0] + pads[1]}x{w + pads[2] + pads[3]})")
    return geom


def check_conv_inputs(op, input, weight, bias, residual, stride, padding, dilation, groups, activation):
    check_same_device(op, input=input, weight=weight, bias=bias)
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        check_float_dtype(op, name, t)
    if input.dim() != 4:
        raise ValueError(f"{op}: expected a 4-D input (N, C, H, W), got shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{op}: expected a 4-D weight (C_out, C_in/groups, KH, KW), got {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"{op}: input ({input.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if input.numel() == 0:
        raise ValueError(f"{op}: empty input of shape {tuple(input.shape)}")
    activation_code(op, activation)
    geom = conv_geometry(op, input.shape, weight.shape, stride, padding, dilation, groups)
    if bias is not None and bias.shape != (geom.c_out,):
        raise ValueError(f"{op}: bias must have shape ({geom.c_out},), got {tuple(bias.shape)}")
    check_residual(op, residual, input, geom.out_shape)
    return geom


# ----------------------------------------------------------------------------- launchers


def _empty_cl(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return empty_4d(shape, like, True, dtype)


@shape_cached
def _precision_of(dtype: torch.dtype, allow_tf32: bool) -> dict:
    """Compile-time options of the GEMM kernels for ``dtype``: fp64 takes the FMA path;
    fp32 follows ``torch.backends.cudnn.allow_tf32`` like PyTorch's conv."""
    fp64 = dtype == torch.float64
    tf32 = dtype != torch.float32 or allow_tf32
    return dict(FMA=fp64, INPUT_PRECISION="tf32" if tf32 and not fp64 else "ieee", ACC=tl_acc(dtype))


def _pick_gemm(kernels, dtype):
    dot_kernel, fma_kernel = kernels
    return fma_kernel if dtype == torch.float64 else dot_kernel


def _fwd_grid(g: ConvGeometry):
    m_total, cg_out = g.n * g.oh * g.ow, g.c_out // g.groups

    def grid(meta):
        return (cdiv(m_total, meta["BLOCK_M"]), cdiv(cg_out, meta["BLOCK_N"]), g.groups)

    return grid


def is_stem(g: ConvGeometry, dtype: torch.dtype) -> bool:
    """Whether the launchers take the stem path (:data:`vhist.kernels.conv.STEM_CHANNELS`):
    at most 4 input channels, no groups, a tensor-core dtype (fp64 keeps its FMA path)."""
    return g.c_in <= 4 and g.groups == 1 and dtype != torch.float64


def _pad_launch(shape, strides, channels: int, device) -> Launch:
    from vhist.kernels import conv as kernels

    n, c, h, w = shape
    if channels < c or channels & (channels - 1):
        raise ValueError(f"{OP}: cannot pad {c} channels to {channels}: the width must be a power of two >= {c}")
    rows = n * h * w
    return Launch(kernels.conv2d_fwd_pad, (cdiv(rows, kernels.PAD_BLOCK_R),), (rows, c, h, w, *strides),
                  C_PAD=channels, BLOCK_R=kernels.PAD_BLOCK_R)


_PAD_LAUNCHES = new_cache()


def pad_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """``t`` (N, C, H, W) zero-padded to ``channels`` channels (a power of two >= C),
    channels_last, in one kernel launch (the stem path's input and weight)."""
    key = (t.shape, t.stride(), channels, t.device)
    launch = lookup(_PAD_LAUNCHES, key, _pad_launch, *key)
    padded_shape = (t.shape[0], channels, t.shape[2], t.shape[3])
    padded = torch.empty_strided(padded_shape, channels_last_strides(padded_shape), dtype=t.dtype, device=t.device)
    launch(t, padded)
    return padded


def stats_config(g: ConvGeometry, input: torch.Tensor) -> triton.Config:
    """The config of a BatchNorm-statistics forward launch: the first of the shape's
    shortlist (:func:`vhist.kernels._config.shortlist`, the config ``VHIST_AUTOTUNE=0``
    runs), a function of the geometry, the dtype and the device's SM count only, never of
    what autotuning picked; so are the number of partials (one per BLOCK_M rows) and the
    order of every sum, and with them the statistics' bits."""
    return _stats_config(g, input.dtype, input.device)


@shape_cached
def _stats_config(g: ConvGeometry, dtype: torch.dtype, device: torch.device) -> triton.Config:
    from vhist.kernels import conv as kernels
    from vhist.kernels._config import shortlist

    if is_stem(g, dtype):
        configs = kernels.STEM_FWD_CONFIGS
    else:
        configs = kernels.FP64_CONFIGS if dtype == torch.float64 else kernels.GEMM_CONFIGS
    # The shortlist reads the launch's device (its SM count) off a tensor argument.
    x = torch.empty(0, dtype=dtype, device=device)
    args = {"X": x, "N": g.n, "OH": g.oh, "OW": g.ow, "CG_OUT": g.c_out // g.groups, "grid": _fwd_grid(g)}
    return shortlist(kernels.conv2d_fwd_stats.__name__, configs, args)[0]


def channel_align(dtype: torch.dtype, counts: tuple, strides: tuple) -> int:
    """The kernels' CH_ALIGN (:func:`vhist.kernels.conv._aligned`): the number of elements
    (a power of two, 16 bytes at most) that divides every channel count in ``counts`` and
    every row stride of the tensors whose ``strides`` (N, C, H, W) are given, when each
    has its channels innermost; 1 where Triton already sees the alignment (everything a
    multiple of 16 elements) or there is none to assert.

    Args:
        counts: the channel counts bounding the channel masks (CG_IN, CG_OUT).
        strides: the (N, C, H, W) element strides of the tensors loaded along channels.
    """
    values = (*counts, *(v for st in strides for v in (st[0], st[2], st[3])))
    if any(st[1] != 1 for st in strides) or all(v % 16 == 0 for v in values):
        return 1
    align = 16 // torch.empty((), dtype=dtype).element_size()
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


def _geom_args(g: ConvGeometry) -> tuple:
    return (g.n, g.h, g.w, g.oh, g.ow, g.c_in // g.groups, g.c_out // g.groups, g.kh, g.kw,
            g.stride[0], g.stride[1], g.padding[0], g.padding[2], g.dilation[0], g.dilation[1])


def _prologue_flags(prologue: Optional[tuple]) -> Optional[tuple]:
    """What a launch depends on in a ``prologue`` (see :func:`conv_fwd_launch`): whether it
    has a weight and a bias, and its activation; None without a prologue."""
    if prologue is None:
        return None
    _, _, weight, bias, activation, negative_slope = prologue
    return weight is not None, bias is not None, activation, kernel_slope(activation, negative_slope)


def _prologue_constexprs(flags: Optional[tuple]) -> dict:
    if flags is None:
        return dict(PROLOGUE=False, PRE_HAS_W=False, PRE_HAS_B=False,
                    **activation_constexprs(0, DEFAULT_NEGATIVE_SLOPE, "PRE_"))
    has_weight, has_bias, activation, negative_slope = flags
    return dict(PROLOGUE=True, PRE_HAS_W=has_weight, PRE_HAS_B=has_bias,
                **activation_constexprs(activation, negative_slope, "PRE_"))


def _prologue_tensors(prologue: Optional[tuple], placeholder: torch.Tensor) -> tuple:
    """The (PreMean, PreRstd, PreW, PreB) pointers of a GEMM launch."""
    if prologue is None:
        return placeholder, placeholder, placeholder, placeholder
    mean, rstd, weight, bias, _, _ = prologue
    return mean, rstd, weight if weight is not None else mean, bias if bias is not None else mean


@dataclass(frozen=True)
class _FwdPlan:
    """What a forward GEMM launch derives from its key (:func:`conv_fwd_launch`)."""

    launch: Launch
    out_strides: tuple
    stem_channels: int  # the stem path's padded input channels, 0 off it
    tiles: int  # BN-statistics partials (rows of the partial buffers), 0 without stats
    scratch: dict = field(default_factory=dict, compare=False, repr=False)  # the partials (launch_cache.scratch)


def _fwd_plan(g: ConvGeometry, dtype, x_strides, w_strides, has_bias, has_residual, activation, negative_slope,
              write_pre, stats, prologue_flags, allow_tf32, device) -> _FwdPlan:
    from vhist.kernels import conv as kernels

    stem = is_stem(g, dtype)
    if stem and prologue_flags is not None:
        raise NotImplementedError(f"{OP}: no BatchNorm prologue on the stem path (at most 4 input channels)")
    grid = _fwd_grid(g)
    out_strides = channels_last_strides(g.out_shape)
    constexprs = dict(HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual, STATS=stats, WRITE_PRE=write_pre,
                      **activation_constexprs(activation, negative_slope), **_prologue_constexprs(prologue_flags),
                      **_precision_of(dtype, allow_tf32))
    tiles = 0
    if stats:
        config = _stats_config(g, dtype, device)
        tiles = cdiv(g.positions, config.kwargs["BLOCK_M"])
        kernel, grid = kernels.conv2d_fwd_stats, grid(config.kwargs)
        constexprs.update(config.all_kwargs())
    else:
        kernel = kernels.conv2d_fwd_stem if stem else _pick_gemm(kernels.conv2d_fwd, dtype)
    if not stem:
        constexprs["CH_ALIGN"] = channel_align(dtype, (g.c_in // g.groups,), (x_strides, w_strides))
    if stem:
        g = dataclasses.replace(g, c_in=kernels.STEM_CHANNELS)
        x_strides = channels_last_strides((g.n, g.c_in, g.h, g.w))
        w_strides = channels_last_strides((g.c_out, g.c_in, g.kh, g.kw))
    return _FwdPlan(Launch(kernel, grid, (*_geom_args(g), *x_strides, *w_strides, *out_strides), **constexprs),
                    out_strides, kernels.STEM_CHANNELS if stem else 0, tiles)


_FWD_PLANS = new_cache()


def conv_fwd_launch(input, weight, bias, residual, g: ConvGeometry, activation: int, stats: bool,
                    prologue: Optional[tuple] = None, negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
                    pre: Optional[torch.Tensor] = None):
    """Runs the forward GEMM. Returns (output, partials): partials are (mean, M2, count,
    num_tiles) of the BN statistics when ``stats``, else None; they are the plan's
    scratch (:func:`vhist.ops.launch_cache.scratch`), to be merged before the next call
    of the same shape. ``prologue``, when given, is ``(mean, rstd, weight, bias,
    activation_code, negative_slope)``: the input is a raw conv output whose BatchNorm
    (its batch statistics, affine parameters or None) and activation the kernel applies to
    each loaded tile. ``pre``, when given (a channels_last tensor of the output's shape),
    also receives the pre-activation."""
    weight = to_channels_last(weight)
    key = (g, input.dtype, input.stride(), weight.stride(), bias is not None, residual is not None, activation,
           kernel_slope(activation, negative_slope), pre is not None, stats, _prologue_flags(prologue),
           cudnn_allow_tf32(), input.device)
    plan = lookup(_FWD_PLANS, key, _fwd_plan, *key)
    out = torch.empty_strided(g.out_shape, plan.out_strides, dtype=input.dtype, device=input.device)
    if residual is not None:
        residual = like_layout(residual, out)
    if plan.stem_channels:
        input = pad_channels(input, plan.stem_channels)
        weight = pad_channels(weight, plan.stem_channels)
    if stats:
        part_mean, part_m2, part_count = scratch(plan.scratch, input,
                                                 lambda: partial_buffers(plan.tiles, g.c_out, input, counts=True))
    else:
        part_mean = part_m2 = part_count = out
    plan.launch(input, weight, or_placeholder(bias, out), or_placeholder(residual, out), out, or_placeholder(pre, out),
                part_mean, part_m2, part_count, *_prologue_tensors(prologue, out))
    if not stats:
        return out, None
    return out, (part_mean, part_m2, part_count, plan.tiles)


def _dgrad_launch(g: ConvGeometry, dtype, grad_strides, w_strides, activation, negative_slope, allow_tf32,
                  device) -> Launch:
    from vhist.kernels import conv as kernels

    cg_in = g.c_in // g.groups
    s_h, s_w = g.stride
    rows = g.n * cdiv(g.h, s_h) * cdiv(g.w, s_w)  # per output phase

    def grid(meta):
        return (cdiv(rows, meta["BLOCK_M"]), cdiv(cg_in, meta["BLOCK_N"]), g.groups * s_h * s_w)

    kernel = kernels.conv2d_bwd_dgrad_stem if is_stem(g, dtype) else _pick_gemm(kernels.conv2d_bwd_dgrad, dtype)
    dx_strides = channels_last_strides((g.n, g.c_in, g.h, g.w))
    align = 1 if is_stem(g, dtype) else channel_align(dtype, (g.c_out // g.groups,), (grad_strides,))
    return Launch(kernel, grid, (*_geom_args(g), *grad_strides, *w_strides, *dx_strides),
                  **activation_constexprs(activation, negative_slope), CH_ALIGN=align,
                  **_precision_of(dtype, allow_tf32))


_DGRAD_LAUNCHES = new_cache()


def dgrad_launch(grad, output, weight, g: ConvGeometry, activation: int, like: torch.Tensor,
                 negative_slope: float = DEFAULT_NEGATIVE_SLOPE):
    """The input gradient, channels_last in ``like``'s dtype; ``grad`` is first multiplied
    by the activation's derivative at ``output`` (what the forward saved, with ``grad``'s
    strides: its output for ReLU / ReLU6, the pre-activation otherwise)."""
    weight = to_channels_last(weight)
    key = (g, grad.dtype, grad.stride(), weight.stride(), activation, kernel_slope(activation, negative_slope),
           cudnn_allow_tf32(), grad.device)
    launch = lookup(_DGRAD_LAUNCHES, key, _dgrad_launch, *key)
    dx = _empty_cl((g.n, g.c_in, g.h, g.w), like)
    launch(grad, or_placeholder(output, grad), weight, dx)
    return dx


def wgrad_split(g: ConvGeometry, device: torch.device) -> int:
    """Number of split-K partials for the weight gradient (:func:`vhist.ops.heuristics.wgrad_split`)."""
    tile = heuristics.WGRAD_TILE
    weight_tiles = cdiv(g.c_out // g.groups, tile) * cdiv(g.c_in // g.groups, tile) * g.kh * g.kw
    return heuristics.wgrad_split(g.positions, weight_tiles * g.groups, device)


@dataclass(frozen=True)
class _WgradPlan:
    """What a weight-gradient launch derives from its key (:func:`wgrad_launch`)."""

    split: int
    numel: int
    gemm: Launch
    reduce_dw: Launch
    reduce_db: Launch
    dw_strides: tuple
    scratch: dict = field(default_factory=dict, compare=False, repr=False)  # split-K partials (launch_cache.scratch)


def _wgrad_plan(g: ConvGeometry, dtype, grad_strides, x_strides, split, want_db, activation, negative_slope,
                prologue_flags, allow_tf32, device) -> _WgradPlan:
    from vhist.kernels import conv as kernels

    split = split or wgrad_split(g, device)
    per_split, split = heuristics.wgrad_positions_per_split(g.positions, split)
    cg_in, cg_out = g.c_in // g.groups, g.c_out // g.groups
    numel = g.c_out * g.kh * g.kw * cg_in

    def grid(meta):
        return (cdiv(cg_out, meta["BLOCK_M"]) * cdiv(cg_in, meta["BLOCK_N"]), g.kh * g.kw, split * g.groups)

    gemm = Launch(_pick_gemm(kernels.conv2d_bwd_wgrad, dtype), grid,
                  (*_geom_args(g), *grad_strides, *x_strides, per_split, g.groups), HAS_DBIAS=want_db,
                  **activation_constexprs(activation, negative_slope),
                  CH_ALIGN=channel_align(dtype, (cg_out, cg_in), (grad_strides, x_strides)),
                  **_prologue_constexprs(prologue_flags), **_precision_of(dtype, allow_tf32))
    block, acc = kernels.WGRAD_REDUCE_BLOCK, tl_acc(dtype)
    reduce_dw = Launch(kernels.conv2d_bwd_wgrad_reduce, (cdiv(numel, block),), (numel, split), ACC=acc, BLOCK=block)
    reduce_db = Launch(kernels.conv2d_bwd_wgrad_reduce, (cdiv(g.c_out, block),), (g.c_out, split), ACC=acc,
                       BLOCK=block)
    return _WgradPlan(split, numel, gemm, reduce_dw, reduce_db,
                      channels_last_strides((g.c_out, cg_in, g.kh, g.kw)))


_WGRAD_PLANS = new_cache()


def wgrad_launch(grad, output, input, weight_shape, weight_dtype, g: ConvGeometry, activation: int,
                 want_dw: bool, want_db: bool, split: Optional[int] = None, prologue: Optional[tuple] = None,
                 negative_slope: float = DEFAULT_NEGATIVE_SLOPE):
    """Weight (and bias) gradient: split-K partials, then an ordered reduction; ``grad``
    is multiplied by the activation's derivative at ``output`` as in :func:`dgrad_launch`.
    With ``prologue`` (as :func:`conv_fwd_launch`'s) the input tiles are recomputed from
    the raw ``input`` as the forward saw them."""
    key = (g, grad.dtype, grad.stride(), input.stride(), split, want_db, activation,
           kernel_slope(activation, negative_slope), _prologue_flags(prologue), cudnn_allow_tf32(), grad.device)
    plan = lookup(_WGRAD_PLANS, key, _wgrad_plan, *key)
    acc = acc_dtype(grad.dtype)

    def make_partials():
        part_dw = grad.new_empty((plan.split, plan.numel), dtype=acc)
        return (part_dw, grad.new_empty((plan.split, g.c_out), dtype=acc)) if want_db else (part_dw,)

    partials = scratch(plan.scratch, grad, make_partials)
    # Without a bias gradient the kernel's db pointer is part_dw (never written).
    part_dw, part_db = partials[0], partials[-1]
    plan.gemm(grad, or_placeholder(output, grad), input, part_dw, part_db, *_prologue_tensors(prologue, part_dw))
    dw = db = None
    if want_dw:
        dw = torch.empty_strided(weight_shape, plan.dw_strides, device=grad.device, dtype=weight_dtype)
        plan.reduce_dw(part_dw, dw)
    if want_db:
        db = grad.new_empty((g.c_out,), dtype=acc)
        plan.reduce_db(part_db, db)
    return dw, db


@shape_cached(key=op_lists_key)
def geometry_from_lists(input_shape, weight_shape, stride, padding, dilation, groups) -> ConvGeometry:
    """The geometry of a registered op's (already validated) list arguments."""
    return ConvGeometry(*input_shape, weight_shape[0], weight_shape[2], weight_shape[3], tuple(stride),
                        tuple(padding), tuple(dilation), groups)


def conv_backward(grad_output, input, weight, output, g: ConvGeometry, activation: int, want_dx: bool,
                  want_dw: bool, want_db: bool, channels_last_grad: bool = False,
                  negative_slope: float = DEFAULT_NEGATIVE_SLOPE):
    """The conv's input, weight and bias gradients (each None when not wanted; the bias
    gradient in the accumulation dtype), with ``grad_output`` and ``output`` (what the
    forward saved for the activation, needed when ``activation`` is not 0: its output or
    its pre-activation, see :func:`dgrad_launch`) in the layout the kernels read them in.

    dgrad and wgrad read dy through its four strides, so a gradient whose channels are
    innermost (the slice of a larger gradient: the ViT's patch embedding, whose tokens sit
    beside the class token) is not copied; with an activation (its derivative reads the
    saved tensor at dy's offsets) or ``channels_last_grad`` dy is made channels_last.

    Returns:
        ``(grad_input, grad_weight, grad_bias, grad_output, output)``.
    """
    if output is None and not channels_last_grad:
        grad_output = channels_innermost(grad_output)
    else:
        grad_output = to_channels_last(grad_output)
        if output is not None:
            output = like_layout(output, grad_output)
    dx = dgrad_launch(grad_output, output, weight, g, activation, input, negative_slope) if want_dx else None
    dw = db = None
    if want_dw or want_db:
        dw, db = wgrad_launch(grad_output, output, input, weight.shape, weight.dtype, g, activation, want_dw,
                              want_db, negative_slope=negative_slope)
    return dx, dw, db, grad_output, output


@custom_op("vhist::conv2d_fwd", mutates_args=())
def conv2d_fwd(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               residual: Optional[torch.Tensor], stride: list[int], padding: list[int], dilation: list[int],
               groups: int, activation: int, negative_slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``act(conv2d(input, weight) + bias + residual)`` on the implicit-GEMM kernel, on the
    validated arguments of :func:`conv2d` (padding as (top, bottom, left, right),
    activation as its :class:`~vhist.ops.common.Activation` code).

    Returns:
        ``(output, pre_activation)``, channels_last; the pre-activation (what the backward
        of an activation outside :data:`~vhist.ops.common.OUTPUT_GRAD_CODES` reads) is
        empty for the others.
    """
    g = geometry_from_lists(input.shape, weight.shape, stride, padding, dilation, groups)
    pre = None if activation in OUTPUT_GRAD_CODES else _empty_cl(g.out_shape, input)
    out, _ = conv_fwd_launch(input, weight, bias, residual, g, activation, stats=False,
                             negative_slope=negative_slope, pre=pre)
    return op_outputs(input, out, pre)


@conv2d_fwd.register_fake
def _(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope):
    g = geometry_from_lists(input.shape, weight.shape, stride, padding, dilation, groups)
    pre = input.new_empty((0,)) if activation in OUTPUT_GRAD_CODES else _empty_cl(g.out_shape, input)
    return _empty_cl(g.out_shape, input), pre


@custom_op("vhist::conv2d_bwd", mutates_args=())
def conv2d_bwd(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    output: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    activation: int,
    negative_slope: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`conv2d_fwd`.

    Args:
        output: what the forward saved for the activation (needed when ``activation``
            is not 0): its output for the codes in
            :data:`~vhist.ops.common.OUTPUT_GRAD_CODES`, its pre-activation otherwise.
        output_mask: which of (grad_input, grad_weight, grad_bias, grad_residual) to compute.

    Returns:
        ``(grad_input, grad_weight, grad_bias, grad_residual)``, an entry not asked for
        empty. grad_bias is in the accumulation dtype.
    """
    g = geometry_from_lists(input.shape, weight.shape, stride, padding, dilation, groups)
    want_dx, want_dw, want_db, want_dres = output_mask
    dx, dw, db, grad_output, output = conv_backward(grad_output, input, weight, output, g, activation, want_dx,
                                                    want_dw, want_db, channels_last_grad=want_dres,
                                                    negative_slope=negative_slope)
    dres = None
    if want_dres:
        dres = activation_grad(grad_output, output, activation, negative_slope)
        # A distinct tensor: custom ops may not return an alias of an input.
        dres = dres.clone() if dres is grad_output else dres
    return op_outputs(input, dx, dw, db, dres)


@conv2d_bwd.register_fake
def _(grad_output, input, weight, output, stride, padding, dilation, groups, activation, negative_slope,
      output_mask):
    g = geometry_from_lists(input.shape, weight.shape, stride, padding, dilation, groups)
    empty = input.new_empty
    return (_empty_cl(input.shape, input) if output_mask[0] else empty((0,)),
            _empty_cl(weight.shape, weight) if output_mask[1] else empty((0,)),
            input.new_empty((g.c_out,), dtype=acc_dtype(input.dtype)) if output_mask[2] else empty((0,)),
            _empty_cl(g.out_shape, input) if output_mask[3] else empty((0,)))


class Conv2dFunction(torch.autograd.Function):
    """Autograd for the Triton conv2d; saves the input, the weight and, with an
    activation, one tensor for its derivative: the output for ReLU / ReLU6 (its sign
    gives their mask), the pre-activation for the others."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, stride, padding, dilation, groups, activation,
                negative_slope=DEFAULT_NEGATIVE_SLOPE):
        out, pre = conv2d_fwd(input, weight, bias, residual, stride, padding, dilation, groups, activation,
                              negative_slope)
        ctx.save_for_backward(input, weight, (out if activation in OUTPUT_GRAD_CODES else pre) if activation
                              else None)
        ctx.args = (stride, padding, dilation, groups, activation, negative_slope)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, out = ctx.saved_tensors
        need = list(ctx.needs_input_grad[:4])
        dx, dw, db, dres = conv2d_bwd(grad_output, input, weight, out, *ctx.args, need)
        if need[2] and db.dtype != ctx.bias_dtype:
            db = db.to(ctx.bias_dtype)
        return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None,
                dres if need[3] else None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------- fused conv + BN + act


def _forward_with_stats(input, weight, g: ConvGeometry):
    conv_out, (part_mean, part_m2, part_count, _) = conv_fwd_launch(input, weight, None, None, g, 0, stats=True)
    return conv_out, (part_mean, part_m2, part_count)


FUSED_PASSES = ConvPasses(
    geometry=geometry_from_lists,
    forward_with_stats=_forward_with_stats,
    grad_input=lambda dy, input, weight, g: dgrad_launch(dy, None, weight, g, 0, input),
    grad_weight=lambda dy, input, weight, g: wgrad_launch(dy, None, input, weight.shape, weight.dtype, g, 0,
                                                           True, False)[0],
    empty_output=lambda like, shape: _empty_cl(shape, like),
    empty_grad_weight=lambda weight: _empty_cl(weight.shape, weight),
)
# vhist::fused_conv_bn_relu_fwd / _bwd: the registered names keep the design's name.
FUSED_OPS = define_fused_ops("fused_conv_bn_relu", FUSED_PASSES)


# ----------------------------------------------------------------------------- backends


def _conv2d_triton(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None,
                   residual=None, negative_slope=DEFAULT_NEGATIVE_SLOPE):
    g = conv_geometry(OP, input.shape, weight.shape, stride, padding, dilation, groups)
    return Conv2dFunction.apply(to_channels_last(input), weight, bias, residual, *g.op_args(), g.groups,
                                ACTIVATION_CODES[activation], negative_slope)


def eval_conv(input, weight, bias, residual, g: ConvGeometry, activation: int,
              negative_slope: float = DEFAULT_NEGATIVE_SLOPE):
    """``act(conv2d(input, weight) + bias + residual)`` on checked arguments, autograd
    included (a fused op's eval path, BN folded into ``weight`` and ``bias``, as
    :func:`vhist.ops.fused_bn.run_fused_triton` takes it)."""
    return Conv2dFunction.apply(input, weight, bias, residual, *g.op_args(), g.groups, activation, negative_slope)


def _fused_triton(input, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1, padding=0,
                  dilation=1, groups=1, training=True, momentum=0.1, eps=1e-5, activation="relu", residual=None,
                  negative_slope=DEFAULT_NEGATIVE_SLOPE):
    g = conv_geometry(FUSED_OP, input.shape, weight.shape, stride, padding, dilation, groups)
    return run_fused_triton(FUSED_OPS, eval_conv, to_channels_last(input), weight, bn_weight, bn_bias,
                            running_mean, running_var, g, g.groups, training=training, momentum=momentum, eps=eps,
                            activation=activation, residual=residual, negative_slope=negative_slope)


def _conv2d_reference(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None,
                      residual=None, negative_slope=DEFAULT_NEGATIVE_SLOPE):
    out = reference.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        out = out + residual
    return reference.activate(out, activation, negative_slope)


CONV2D_IMPLS = {"triton": _conv2d_triton, "torch": _conv2d_reference}
FUSED_IMPLS = {"triton": _fused_triton, "torch": reference.fused_conv_bn_act}


# ----------------------------------------------------------------------------- public ops


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride=1, padding=0, dilation=1, groups: int = 1, *, activation: Optional[str] = None,
           residual: Optional[torch.Tensor] = None, negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> torch.Tensor:
    """``F.conv2d`` with an activation epilogue: ``act(conv2d(input, weight) + bias + residual)``.

    Args:
        input: (N, C_in, H, W) or unbatched (C_in, H, W); NCHW or channels_last. (The
            package-level :func:`vhist.ops.conv2d` also takes a
            :class:`~vhist.ops.deferred.DeferredBNAct`.)
        weight: (C_out, C_in / groups, KH, KW).
        bias: optional (C_out,).
        stride, dilation: int or pair. padding: int, pair, 'same' or 'valid'.
        groups: number of channel groups.
        activation: a name of :data:`~vhist.ops.common.ACTIVATION_CODES` (None, "relu",
            "relu6", "silu", "hardswish", "leaky_relu", "gelu", "gelu_tanh", "sigmoid",
            "hardsigmoid").
        residual: optional tensor of the output's shape added before the activation.
        negative_slope: leaky relu's slope, as ``F.leaky_relu``'s.

    Returns:
        (N, C_out, OH, OW); channels_last on the triton backend.
    """
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
        residual = residual.unsqueeze(0) if residual is not None else None
    input, weight, bias, residual = autocast_inputs(input, weight, bias, residual)
    check_conv_inputs(OP, input, weight, bias, residual, stride, padding, dilation, groups, activation)
    negative_slope = check_negative_slope(OP, negative_slope)
    impl = dispatch(OP, CONV2D_IMPLS, input.device)
    out = impl(input, weight, bias, stride, padding, dilation, groups, activation=activation, residual=residual,
               negative_slope=negative_slope)
    return out.squeeze(0) if unbatched else out


def fused_conv_bn_act(input, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1,
                      padding=0, dilation=1, groups=1, training=True, momentum=0.1, eps=1e-5,
                      activation: Optional[str] = "relu", residual: Optional[torch.Tensor] = None,
                      negative_slope: float = DEFAULT_NEGATIVE_SLOPE):
    """``act(batch_norm(conv2d(input, weight)) + residual)`` as one op, running statistics
    included (see :func:`vhist.reference.fused_conv_bn_act`). Also available as
    :func:`fused_conv_bn_relu`, the name of the design.

    Args:
        input: (N, C_in, H, W), NCHW or channels_last. (The package-level
            :func:`vhist.ops.fused_conv_bn_act` also takes the
            :class:`~vhist.ops.deferred.DeferredBNAct` of a producing layer, whose BN and
            activation its conv then applies in its prologue.)
        weight: (C_out, C_in / groups, KH, KW) conv weight (the conv has no bias).
        bn_weight, bn_bias: optional (C_out,) BatchNorm affine parameters.
        running_mean, running_var: (C_out,) buffers, updated in place when training; or
            None to always use batch statistics (training only).
        stride, padding, dilation, groups: as :func:`conv2d`.
        training: batch statistics (and running-stat update) or the running ones.
        momentum, eps: as ``F.batch_norm``.
        activation, negative_slope: as :func:`conv2d`.
        residual: optional tensor of the output's shape added before the activation.

    Returns:
        (N, C_out, OH, OW); channels_last on the triton backend.
    """
    input, weight, residual = autocast_inputs(input, weight, residual)
    g = check_conv_inputs(FUSED_OP, input, weight, None, None, stride, padding, dilation, groups, activation)
    check_fused_args(FUSED_OP, g, input, bn_weight, bn_bias, running_mean, running_var, training, residual)
    negative_slope = check_negative_slope(FUSED_OP, negative_slope)
    impl = dispatch(FUSED_OP, FUSED_IMPLS, input.device)
    return impl(input, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
                padding=padding, dilation=dilation, groups=groups, training=training,
                momentum=momentum, eps=eps, activation=activation, residual=residual,
                negative_slope=negative_slope)


# The design's name for the fused op (it also runs ReLU6 and no activation).
fused_conv_bn_relu = fused_conv_bn_act
