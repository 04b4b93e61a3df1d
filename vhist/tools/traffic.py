"""Memory traffic by design, from recorded launches.

Every pointer argument of every vhist Triton kernel has a declared role in
:data:`ROLES`: read, written, or both, and, where a constexpr switches the access on,
the condition (a placeholder pointer that the kernel never touches moves no bytes). From
the launches an op really makes (:func:`vhist.tools.launches.record_launches`, nothing
run), :func:`count_traffic` adds up, per kernel and in total, the bytes each tensor
contributes and the *activation-sized passes*: each read or write of a tensor with at
least as many elements as the op's smallest activation is one pass. A tensor a kernel
reads in several places (the same tile twice, a conv's halo, the input of an implicit
GEMM under several output-channel tiles) counts once: by design those re-reads hit L1/L2.
Statistics, parameters and partial sums are counted in bytes, not passes.

:func:`op_traffic` drives one op's forward or backward launchers on CPU tensors of any
size (uninitialized, never touched) and returns its :class:`Traffic`; :data:`MINIMUM_PASSES`
holds the README's per-op minimum for each mode (:func:`minimum_passes` adds a residual).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from vhist.tools.launches import LaunchRecord, record_launches

# A role is "r", "w" or "rw", or (role, condition on the launch's constexprs).
Role = Union[str, tuple[str, Callable[[dict], bool]]]


def _on(name: str) -> Callable[[dict], bool]:
    return lambda c: bool(c.get(name))


_ACT = _on("ACTIVATION")

ROLES: dict[str, dict[str, Role]] = {
    # kernels/batch_norm.py
    "_bn_fwd_stats_kernel": {"X": "r", "PartMean": "w", "PartM2": "w", "PartCount": "w"},
    "_bn_fwd_merge_kernel": {"PartMean": "r", "PartM2": "r", "PartCount": "r",
                             "GroupMean": "w", "GroupM2": "w", "GroupCount": "w"},
    "_bn_fwd_finalize_kernel": {"PartMean": "r", "PartM2": "r", "PartCount": "r", "Mean": "w", "Rstd": "w",
                                "RunningMean": ("rw", _on("UPDATE_RUNNING")),
                                "RunningVar": ("rw", _on("UPDATE_RUNNING"))},
    "_bn_fwd_apply_kernel": {"X": "r", "Y": "w", "Mean": "r", "Rstd": "r", "W": ("r", _on("HAS_W")),
                             "Bias": ("r", _on("HAS_B")), "Res": ("r", _on("HAS_RESIDUAL"))},
    "_bn_bwd_reduce_kernel": {"DY": "r", "X": "r", "Mean": "r", "Rstd": "r",
                              "W": ("r", lambda c: c.get("HAS_W") and c.get("ACTIVATION")),
                              "Bias": ("r", lambda c: c.get("HAS_B") and c.get("ACTIVATION")),
                              "Res": ("r", lambda c: c.get("HAS_RESIDUAL") and c.get("ACTIVATION")),
                              "PartSumDy": "w", "PartSumDyXhat": "w", "DZ": ("w", _on("WRITE_DZ"))},
    "_bn_bwd_merge_kernel": {"PartSumDy": "r", "PartSumDyXhat": "r", "GroupSumDy": "w", "GroupSumDyXhat": "w"},
    "_bn_bwd_finalize_kernel": {"PartSumDy": "r", "PartSumDyXhat": "r", "SumDy": "w", "SumDyXhat": "w",
                                "DW": ("w", _on("WRITE_DW")), "DB": ("w", _on("WRITE_DB"))},
    "_bn_bwd_dx_kernel": {"DY": "r",
                          "X": ("r", lambda c: c.get("TRAINING") or c.get("ACTIVATION") or c.get("X_ACTIVATION")),
                          "DX": "w", "Mean": "r", "Rstd": "r", "W": ("r", _on("HAS_W")),
                          "SumDy": ("r", _on("TRAINING")), "SumDyXhat": ("r", _on("TRAINING")),
                          "Bias": ("r", lambda c: c.get("HAS_B") and c.get("ACTIVATION")),
                          "Res": ("r", lambda c: c.get("HAS_RESIDUAL") and c.get("ACTIVATION")),
                          "DRes": ("w", _on("WRITE_DRES"))},
    # kernels/conv.py
    "_conv2d_fwd_kernel": {"X": "r", "Wt": "r", "Bias": ("r", _on("HAS_BIAS")), "Res": ("r", _on("HAS_RESIDUAL")),
                           "Y": "w", "Z": ("w", _on("WRITE_PRE")), "PartMean": ("w", _on("STATS")),
                           "PartM2": ("w", _on("STATS")), "PartCount": ("w", _on("STATS")),
                           "PreMean": ("r", _on("PROLOGUE")), "PreRstd": ("r", _on("PROLOGUE")),
                           "PreW": ("r", _on("PRE_HAS_W")), "PreB": ("r", _on("PRE_HAS_B"))},
    "_conv2d_bwd_dgrad_kernel": {"DY": "r", "Y": ("r", _ACT), "Wt": "r", "DX": "w"},
    "_conv2d_bwd_wgrad_kernel": {"DY": "r", "Y": ("r", _ACT), "X": "r", "PartDW": "w",
                                 "PartDB": ("w", _on("HAS_DBIAS")), "PreMean": ("r", _on("PROLOGUE")),
                                 "PreRstd": ("r", _on("PROLOGUE")), "PreW": ("r", _on("PRE_HAS_W")),
                                 "PreB": ("r", _on("PRE_HAS_B"))},
    "_conv2d_bwd_wgrad_reduce_kernel": {"Part": "r", "Out": "w"},
    "_conv2d_fwd_pad_kernel": {"X": "r", "Y": "w"},
    # kernels/depthwise.py
    "_depthwise_fwd_kernel": {"X": "r", "Wt": "r", "Bias": ("r", _on("HAS_BIAS")),
                              "Res": ("r", _on("HAS_RESIDUAL")), "Y": "w", "Z": ("w", _on("WRITE_PRE")),
                              "PartMean": ("w", _on("STATS")),
                              "PartM2": ("w", _on("STATS")), "PartCount": ("w", _on("STATS"))},
    "_depthwise_bwd_input_kernel": {"DY": "r", "Y": ("r", _ACT), "Wt": "r", "DX": "w"},
    "_depthwise_bwd_weight_reduce_kernel": {"DY": "r", "Out": ("r", _ACT), "X": "r", "Part": "w"},
    "_depthwise_bwd_weight_merge_kernel": {"Part": "r", "Group": "w"},
    "_depthwise_bwd_weight_finalize_kernel": {"Part": "r", "DW": "w", "DB": ("w", _on("HAS_BIAS"))},
    "_depthwise_bwd_kernel": {"DY": "r", "Y": ("r", _ACT), "DYB": ("r", _on("HAS_BIAS")), "X": "r", "Wt": "r",
                              "DX": "w", "Part": "w"},
    # kernels/local_response_norm.py
    "_lrn_fwd_kernel": {"X": "r", "Y": "w"},
    "_lrn_bwd_kernel": {"X": "r", "DY": "r", "DX": "w"},
    # kernels/common.py
    "_partials_sum_kernel": {"PartA": ("r", _on("HAS_A")), "PartB": ("r", _on("HAS_B")), "A": ("w", _on("HAS_A")),
                             "B": ("w", _on("HAS_B"))},
    # kernels/layer_norm.py
    "_layer_norm_fwd_kernel": {"X": "r", "Res": ("r", _on("HAS_RESIDUAL")), "W": ("r", _on("HAS_W")),
                               "Bias": ("r", _on("HAS_B")), "Y": "w", "Sum": ("w", _on("HAS_RESIDUAL")),
                               "Mean": "w", "Rstd": "w"},
    "_layer_norm_bwd_dx_kernel": {"DY": "r", "X": "r", "W": ("r", _on("HAS_W")), "Mean": "r", "Rstd": "r",
                                  "DRes": ("r", _on("HAS_DRES")), "DX": "w", "PartDW": ("w", _on("COMPUTE_DW")),
                                  "PartDB": ("w", _on("COMPUTE_DB"))},
    # kernels/gelu.py
    "_bias_gelu_fwd_kernel": {"X": "r", "Bias": ("r", _on("HAS_BIAS")), "Y": "w"},
    "_bias_gelu_bwd_kernel": {"DY": "r", "X": "r", "Bias": ("r", _on("HAS_BIAS")), "DX": "w",
                              "PartDB": ("w", _on("COMPUTE_DB"))},
    # kernels/attention.py (K and V re-read per query block, Q and dO per key block: by
    # design from L2, counted once as every re-read here)
    "_attention_fwd_kernel": {"Q": "r", "K": "r", "V": "r", "O": "w", "LSE": "w"},
    "_attention_bwd_preprocess_kernel": {"O": "r", "DO": "r", "Delta": "w"},
    "_attention_bwd_dkdv_kernel": {"Q": "r", "K": "r", "V": "r", "DO": "r", "LSE": "r", "Delta": "r", "DK": "w",
                                   "DV": "w"},
    "_attention_bwd_dq_kernel": {"Q": "r", "K": "r", "V": "r", "DO": "r", "LSE": "r", "Delta": "r", "DQ": "w"},
}

# The README's minimum per op and mode, in activation-sized passes (a read or a write of
# one activation). BatchNorm's two-pass training algorithm reads x for the statistics,
# then reads it and writes y; its backward reads dy and x for the sums, then dy and x
# again and writes dx. The fused conv + BN ops add the conv's read of its input and its
# write of the conv output (forward), and after dz the conv's input gradient (reads dz,
# writes dx) and weight gradient (reads dz and x); the depthwise conv computes both
# gradients from one read of dz (dz, x, dx), one pass fewer. The plain depthwise conv:
# forward x + y, backward dy + x read once and dx written (README: fwd+bwd 3x + 2y).
# LRN: forward x + y, backward x + dy + dx.
MINIMUM_PASSES = {
    ("batch_norm", "forward"): 3, ("batch_norm", "backward"): 5,
    ("fused_conv_bn_act", "forward"): 4, ("fused_conv_bn_act", "backward"): 9,
    ("fused_depthwise_bn_act", "forward"): 4, ("fused_depthwise_bn_act", "backward"): 8,
    ("depthwise_conv2d", "forward"): 2, ("depthwise_conv2d", "backward"): 3,
    ("local_response_norm", "forward"): 2, ("local_response_norm", "backward"): 3,
}



def minimum_passes(op: str, mode: str, residual: bool = False, activation: int = 1) -> int:
    """:data:`MINIMUM_PASSES` of ``(op, mode)``; a fused op's residual adds its read to
    the forward, and to the backward the write of its gradient plus, with an
    activation, a read (the activation's mask needs the residual)."""
    if (op, mode) not in MINIMUM_PASSES:
        raise ValueError(f"traffic: no minimum for op {op!r} in mode {mode!r}")
    extra = 0
    if residual:
        extra = 1 if mode == "forward" else 1 + int(bool(activation))
    return MINIMUM_PASSES[(op, mode)] + extra


@dataclass
class Access:
    """One tensor one launch reads or writes."""

    launch: int  # index of the launch in the sequence
    kernel: str
    arg: str
    role: str
    numel: int
    bytes: int
    activation: bool


@dataclass
class Traffic:
    """The traffic of a sequence of launches (see :func:`count_traffic`)."""

    accesses: list[Access] = field(default_factory=list)
    launches: int = 0

    @property
    def passes(self) -> int:
        """Activation-sized reads plus writes."""
        return sum(len(a.role) for a in self.accesses if a.activation)

    @property
    def activation_bytes(self) -> int:
        return sum(a.bytes * len(a.role) for a in self.accesses if a.activation)

    @property
    def other_bytes(self) -> int:
        """Statistics, parameters and partials."""
        return sum(a.bytes * len(a.role) for a in self.accesses if not a.activation)

    def passes_by_kernel(self) -> list[str]:
        """``"kernel: X:r DY:r DX:w"`` per launch with activation-sized accesses, in order."""
        by_launch: dict[int, list[Access]] = {}
        for a in self.accesses:
            if a.activation:
                by_launch.setdefault(a.launch, []).append(a)
        return [f"{accs[0].kernel}: " + " ".join(f"{a.arg}:{a.role}" for a in accs) for accs in by_launch.values()]


def launch_accesses(record: LaunchRecord, activation_numel: int, launch: int = 0) -> list[Access]:
    """The declared accesses of one recorded launch (the ``launch``-th of a sequence).

    Raises:
        KeyError: the kernel, or one of its pointer arguments, has no declared role.
    """
    if record.kernel not in ROLES:
        raise KeyError(f"traffic: no roles declared for kernel {record.kernel} (vhist.tools.traffic.ROLES)")
    roles, constexprs = ROLES[record.kernel], {**record.constexprs, **dict(record.candidates[0][0].kwargs)}
    out = []
    for arg in record.pointers():
        if arg.name not in roles:
            raise KeyError(f"traffic: no role declared for {record.kernel}'s pointer {arg.name}")
        role = roles[arg.name]
        if isinstance(role, tuple):
            role, condition = role
            if not condition(constexprs):
                continue
        numel = 1
        for size in arg.shape:
            numel *= size
        out.append(Access(launch, record.kernel, arg.name, role, numel, numel * arg.itemsize,
                          numel >= activation_numel))
    return out


def count_traffic(records: list[LaunchRecord], activation_numel: int) -> Traffic:
    """The traffic of ``records``; a tensor of at least ``activation_numel`` elements is
    activation-sized."""
    traffic = Traffic(launches=len(records))
    for i, record in enumerate(records):
        traffic.accesses += launch_accesses(record, activation_numel, i)
    return traffic


# ----------------------------------------------------------------------------- op drivers


def _empty(shape, channels_last: bool, dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    return t.to(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def _bn_params(c):
    return [torch.empty(c) for _ in range(4)]


def _drive(op: str, shape, conv: Optional[dict], channels_last: bool, dtype, activation: int,
           residual: bool):
    """Runs ``op``'s training forward through its registered op; returns (its input
    and output tensors, a callable running the matching backward)."""
    import vhist.ops  # noqa: F401  (registers the ops)
    from vhist.ops import conv as conv_ops, depthwise as dw_ops

    ops = torch.ops.vhist
    x = _empty(shape, channels_last, dtype)
    if op == "batch_norm":
        w, b, rm, rv = _bn_params(shape[1])
        y, mean, rstd = ops.batch_norm_fwd(x, w, b, rm, rv, True, 0.1, 1e-5)
        return [x, y], lambda: ops.batch_norm_bwd(torch.empty_like(y), x, w, b, mean, rstd, True, 1e-5,
                                                  [True, True, True])
    if op == "local_response_norm":
        y = ops.local_response_norm_fwd(x, 5, 1e-4, 0.75, 2.0)
        return [x, y], lambda: ops.local_response_norm_bwd(torch.empty_like(y), x, 5, 1e-4, 0.75, 2.0)
    c_out, k, stride, pad = conv["c_out"], conv["kernel"], conv["stride"], conv["padding"]
    depthwise = op in ("depthwise_conv2d", "fused_depthwise_bn_act")
    groups = shape[1] if depthwise else conv.get("groups", 1)
    weight = torch.empty(c_out, shape[1] // groups, k, k, dtype=dtype)
    passes = dw_ops.FUSED_PASSES if depthwise else conv_ops.FUSED_PASSES
    geom = passes.geometry(shape, weight.shape, [stride] * 2, [pad] * 4, [1, 1], groups)
    stride_l, padding_l, dilation_l = geom.op_args()
    if op == "depthwise_conv2d":
        # Through the op's autograd Function, so the backward is the launches it chooses.
        x.requires_grad_()
        weight.requires_grad_()
        y = dw_ops.DepthwiseConv2dFunction.apply(x, weight, None, None, stride_l, padding_l, dilation_l, 0,
                                                 dw_ops.TRITON_OPS)
        return [x, y], lambda: y.backward(torch.empty_like(y))
    fwd = ops.fused_depthwise_bn_act_fwd if depthwise else ops.fused_conv_bn_relu_fwd
    bwd = ops.fused_depthwise_bn_act_bwd if depthwise else ops.fused_conv_bn_relu_bwd
    w, b, rm, rv = _bn_params(c_out)
    res = torch.empty(passes.empty_output(x, geom.out_shape).shape, dtype=dtype) if residual else None
    if res is not None and channels_last:
        res = res.to(memory_format=torch.channels_last)
    y, conv_out, mean, rstd = fwd(x, weight, w, b, rm, rv, res, stride_l, padding_l, dilation_l, groups, 0.1,
                                  1e-5, activation, 0.01)
    tensors = [x, y] + ([res] if res is not None else [])
    return tensors, lambda: bwd(torch.empty_like(y), x, weight, conv_out, mean, rstd, w, b, res, stride_l,
                                padding_l, dilation_l, groups, 1e-5, activation, 0.01,
                                [True, True, True, True, res is not None])


def op_traffic(op: str, mode: str, shape, *, conv: Optional[dict] = None, channels_last: bool = True,
               dtype=torch.bfloat16, activation: int = 1, residual: bool = False,
               sm_count: Optional[int] = None) -> Traffic:
    """The designed traffic of one op in one mode, from the launches its registered
    ops make (recorded, not run; CPU tensors of the real size, never touched).

    Args:
        op: a key of :data:`MINIMUM_PASSES`'s first column.
        mode: "forward" or "backward" (the training backward of that forward).
        shape: the input's (N, C, H, W).
        conv: for the conv ops, ``dict(c_out=, kernel=, stride=, padding=[, groups=])``.
        activation: the fused ops' activation code (0 none, 1 ReLU, 2 ReLU6).
        residual: the fused ops with a residual input (its read is one more pass forward,
            and its gradient's write one more backward).
        sm_count: the SM count the launchers see (default: the recorder's, 132).

    Returns:
        The :class:`Traffic` of that mode's launches; activation-sized means at least
        the op's smallest activation (input or output).
    """
    if mode not in ("forward", "backward"):
        raise ValueError(f"traffic: mode must be 'forward' or 'backward', got {mode!r}")
    if (op, mode) not in MINIMUM_PASSES:
        raise ValueError(f"traffic: unknown op {op!r}")
    kwargs = {} if sm_count is None else dict(sm_count=sm_count)
    with record_launches(**kwargs) as rec:
        tensors, backward = _drive(op, shape, conv, channels_last, dtype, activation, residual)
        start = len(rec.records)
        if mode == "backward":
            backward()
    records = rec.records[:start] if mode == "forward" else rec.records[start:]
    return count_traffic(records, min(t.numel() for t in tensors))
