"""A whole training step captured as one CUDA graph (``vhist train --cuda-graph``, and the
``triton+graph`` / ``torch+graph`` providers of bench/models.py).

Replaying a graph launches every kernel of the step (forward, backward, gradient
clipping, optimizer update) with one host call, so the host's Python no longer paces
the GPU. What makes a step capturable:

* static inputs: each batch is copied into buffers allocated once (:class:`CapturedStep`);
* warm-up before capture, on a side stream, so that autotuning, lazily created state
  (optimizer buffers, cuBLAS workspaces) and first-call allocations happen outside it;
* no host synchronization inside: vhist's launchers make none (tests/test_capture_safety.py),
  the NaN check reads a device flag every ``--log-every`` steps, and the learning rate
  reaches the captured update through a device tensor refilled before each replay
  (:class:`GraphOptimizerStep`): AdamW and RMSprop run with ``capturable=True`` and a
  tensor lr during capture; SGD, whose tensor-lr update calls ``.item()`` in eager
  PyTorch, runs an equivalent multi-tensor update here.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def check_cuda_graph(device: torch.device, amp_dtype=None, distributed: bool = False) -> None:
    """Raises ValueError unless a step on ``device`` can be captured: CUDA graphs capture
    GPU work only, fp16's GradScaler checks for overflow on the host every step, and
    DDP's gradient buckets are not captured here."""
    if device.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device (CUDA graphs capture GPU work); this run is on {device}")
    if amp_dtype == torch.float16:
        raise ValueError("--cuda-graph does not support fp16 autocast (its GradScaler syncs with the host every "
                         "step); use bf16 or fp32")
    if distributed:
        raise ValueError("--cuda-graph runs single-process only (not under torchrun)")


class GraphOptimizerStep:
    """The optimizer update of a captured step, with the learning rate read from device
    tensors (one per parameter group) that :meth:`refresh` fills from the groups'
    current (scheduled) float ``lr`` before each replay.

    Args:
        optimizer: an SGD, AdamW or RMSprop optimizer whose state exists (one eager
            step ran before capture).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.kind = type(optimizer).__name__
        if self.kind not in ("SGD", "AdamW", "Adam", "RMSprop"):
            raise ValueError(f"--cuda-graph supports SGD, AdamW and RMSprop, not {self.kind}")
        device = optimizer.param_groups[0]["params"][0].device
        self.lrs = [torch.tensor(float(g["lr"]), device=device) for g in optimizer.param_groups]
        if self.kind != "SGD":
            for group in optimizer.param_groups:
                group["capturable"] = True
                # State created by eager steps without capturable keeps its step count on
                # the CPU; a captured update needs it on the parameters' device.
                for p in group["params"]:
                    state = optimizer.state.get(p, {})
                    if isinstance(state.get("step"), torch.Tensor):
                        state["step"] = state["step"].to(p.device, torch.float32)

    def refresh(self) -> None:
        """Copies each group's scheduled lr into its device tensor (no host sync)."""
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(float(group["lr"]))

    def __call__(self) -> None:
        if self.kind == "SGD":
            with torch.no_grad():
                for lr, group in zip(self.lrs, self.optimizer.param_groups):
                    sgd_update(self.optimizer, group, lr)
            return
        saved = [g["lr"] for g in self.optimizer.param_groups]
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            group["lr"] = lr
        try:
            self.optimizer.step()
        finally:
            for value, group in zip(saved, self.optimizer.param_groups):
                group["lr"] = value


def sgd_update(optimizer: torch.optim.SGD, group: dict, lr: torch.Tensor) -> None:
    """``torch.optim.SGD``'s update of one parameter group (weight decay, momentum with
    dampening, Nesterov) with a device-tensor learning rate, without a host sync.
    Momentum buffers must exist (created by an eager step)."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    if group["weight_decay"]:
        grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
    momentum = group["momentum"]
    if momentum:
        bufs = [optimizer.state[p]["momentum_buffer"] for p in params]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads, alpha=1 - group["dampening"])
        grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
    torch._foreach_add_(params, torch._foreach_mul(grads, torch.neg(lr)))


class CapturedStep:
    """``step(*inputs) -> outputs`` captured once in a CUDA graph, then replayed.

    Args:
        step: the step on static inputs; returns a tensor or a tuple of tensors (static
            outputs, overwritten by each replay).
        inputs: example tensors giving the static buffers' shapes, dtypes and layouts.
        warmup: eager runs on a side stream before capture (autotuning, lazy state);
            the last one's outputs are kept as ``warmup_outputs``.
        before_replay: called before each replay (e.g. :meth:`GraphOptimizerStep.refresh`).
    """

    def __init__(self, step: Callable, inputs: Sequence[torch.Tensor], warmup: int = 3,
                 before_replay: Callable[[], None] | None = None):
        self.static = [torch.empty_like(x).copy_(x) for x in inputs]
        self.before_replay = before_replay
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        self.warmup_outputs = None
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.warmup_outputs = step(*self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step(*self.static)

    def matches(self, *inputs: torch.Tensor) -> bool:
        """Whether ``inputs`` fit the static buffers (a short last batch does not)."""
        return all(x.shape == s.shape and x.dtype == s.dtype for x, s in zip(inputs, self.static))

    def __call__(self, *inputs: torch.Tensor):
        for static, x in zip(self.static, inputs):
            static.copy_(x, non_blocking=True)
        if self.before_replay is not None:
            self.before_replay()
        self.graph.replay()
        return self.outputs


# Eager steps before the capture: autotuning and the optimizer's lazily created state
# (momentum buffers, Adam moments) happen in them.
EAGER_STEPS_BEFORE_CAPTURE = 3


def graph_train_step(run, ep, x: torch.Tensor, labels: torch.Tensor, eager_update: Callable) -> tuple:
    """One training step of ``vhist train --cuda-graph``: the first
    :data:`EAGER_STEPS_BEFORE_CAPTURE` steps run ``eager_update``; the next one is the
    capture's warm-up (a real step on that batch, on a side stream), and every later
    batch of the captured shape replays the graph. A batch of another shape (a short
    last batch) runs eagerly.

    Returns:
        ``(loss, logits)``, static outputs of the graph when replayed.
    """
    state = run.__dict__.setdefault("cuda_graph_state", {"eager": 0, "step": None})
    captured = state["step"]
    if captured is not None and captured.matches(x, labels):
        ep.phase = "update"  # the replay includes the update
        return captured(x, labels)
    if captured is not None or state["eager"] < EAGER_STEPS_BEFORE_CAPTURE:
        state["eager"] += 1
        run.optimizer.zero_grad(set_to_none=True)
        return eager_update(run, ep, x, labels)
    update = GraphOptimizerStep(run.optimizer)
    params = [p for p in run.model.parameters() if p.requires_grad]
    clip = run.recipe.grad_clip

    def step(x, labels):
        run.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
            logits = run.net(x)
        loss = run.criterion(logits.float(), labels)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        update()
        return loss.detach(), logits.detach()

    ep.phase = "update"
    update.refresh()
    captured = state["step"] = CapturedStep(step, (x, labels), warmup=1, before_replay=update.refresh)
    return captured.warmup_outputs


# Ops whose output shape depends on tensor values, or that hand a value to the host.
DATA_DEPENDENT_OPS = ("nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
                      "unique_dim", "repeat_interleave", "_local_scalar_dense", "is_nonzero", "equal", "item")


class CaptureUnsafe(RuntimeError):
    """A step did something a CUDA graph cannot capture."""


class CaptureGuard(TorchDispatchMode):
    """Fails on what a CUDA graph capture cannot contain: a host synchronization
    (``aten._local_scalar_dense``, ``.item()``, ``aten.equal``, ``aten.is_nonzero``), a
    copy between devices (device-to-host), and data-dependent output shapes
    (``aten.nonzero``, ``masked_select``, ``unique``, boolean-mask indexing).

    vhist's registered ops are followed into their implementation (with the guard still
    active), so the aten calls of the launchers are checked too.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if func.namespace == "vhist":
            from vhist.ops.op_call import REGISTRY

            with self:
                return REGISTRY[name].impl(*args, **kwargs)
        base = name.split("::")[-1].split(".")[0]
        if base in DATA_DEPENDENT_OPS:
            raise CaptureUnsafe(f"{name}: a host synchronization or a data-dependent shape")
        if base == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                   for i in (args[1] if len(args) > 1 else ())):
            raise CaptureUnsafe(f"{name} with a boolean mask: a data-dependent shape")
        if base in ("_to_copy", "copy_", "to"):
            src = args[1] if base == "copy_" else args[0]
            dst = args[0].device if base == "copy_" else kwargs.get("device") or src.device
            if isinstance(src, torch.Tensor) and torch.device(dst) != src.device:
                raise CaptureUnsafe(f"{name}: a copy from {src.device} to {dst}")
        return func(*args, **kwargs)


def state_signature(model: torch.nn.Module, optimizer=None) -> dict:
    """What must not change between replays of a captured step: every module's attribute
    names, the identity and storage of every parameter and buffer, and the optimizer's
    state tensors."""
    sig = {}
    for name, module in model.named_modules():
        sig[("attrs", name)] = frozenset(vars(module))
        for kind, tensors in (("param", module._parameters), ("buffer", module._buffers)):
            for key, t in tensors.items():
                sig[(kind, name, key)] = None if t is None else (id(t), t.data_ptr())
    if optimizer is not None:
        for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
            for key, t in optimizer.state.get(p, {}).items():
                if isinstance(t, torch.Tensor):
                    sig[("opt", i, key)] = (id(t), t.data_ptr())
    return sig


def check_same_state(before: dict, after: dict) -> None:
    """Raises :class:`CaptureUnsafe` naming what a step added or replaced."""
    changed = sorted(str(k) for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        raise CaptureUnsafe(f"the step added or replaced module/optimizer state: {', '.join(changed[:8])}")
