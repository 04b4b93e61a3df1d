"""Per-shape caches of the launchers' host work.

Everything a launcher derives from shapes, strides, dtypes, the device and its
hyper-parameters alone (validated conv geometry, channel chunkings, compile options)
is computed once per distinct key and then looked up: a training step repeats the same
few dozen keys hundreds of times. Keys are small tuples of ints, ``torch.Size``,
dtypes and devices; a list is keyed as a tuple, and symbolic sizes (``torch.compile``
with dynamic shapes, fake tensors) skip the cache. A plan can also keep its op-internal
scratch tensors (:func:`scratch`), so that a call allocates only what it returns.

:func:`clear` empties every cache; :func:`vhist.tools.launches.record_launches` calls
it on entry and exit, since the SM count the launchers see changes there.
"""
from __future__ import annotations

import functools
import inspect
import threading
from typing import Callable, Optional

import torch

_CACHES: list[dict] = []
MAX_ENTRIES = 4096  # a cache that grows past this (shape churn) starts over


def hashable(value):
    """``value`` with lists turned into tuples, recursively."""
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    return value


def shape_cached(fn: Optional[Callable] = None, *, key: Optional[Callable] = None) -> Callable:
    """Memoizes ``fn`` on its arguments (keywords bound to positions, lists keyed as tuples). Arguments
    that cannot be hashed (symbolic sizes while tracing) bypass the cache. Exceptions
    are not cached: a bad argument raises every time.

    Args:
        key: optional ``key(*args)`` building the cache key from the positional
            arguments (for hot callers whose arguments hold lists: converting them
            directly is cheaper than the generic fallback, which first fails a lookup).
    """
    if fn is None:
        return functools.partial(shape_cached, key=key)
    cache: dict = {}
    _CACHES.append(cache)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def cached(*args, **kwargs):
        if kwargs:  # keyed positionally, so that f(a, b=1) and f(a, 1) share an entry
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args = bound.args
        cache_key = key(*args) if key is not None else args
        try:
            return cache[cache_key]
        except KeyError:
            pass
        except TypeError:  # a list (keyed as a tuple), or a symbolic size (not cached)
            if key is not None:
                return fn(*args)
            cache_key = args = tuple(hashable(a) for a in args)
            try:
                if cache_key in cache:
                    return cache[cache_key]
            except TypeError:
                return fn(*args)
        value = fn(*args)
        if len(cache) >= MAX_ENTRIES:
            cache.clear()
        cache[cache_key] = value
        return value

    cached.cache = cache
    return cached


def new_cache() -> dict:
    """An empty cache dict that :func:`clear` empties too (for launchers that build the
    key themselves, e.g. from a tensor's shape, strides and device)."""
    cache: dict = {}
    _CACHES.append(cache)
    return cache


def clear() -> None:
    """Empties every launch cache."""
    for cache in _CACHES:
        cache.clear()


def lookup(cache: dict, key, build: Callable, *args):
    """``cache[key]``, made by ``build(*args)`` on a miss; a key that cannot be hashed
    (symbolic sizes while tracing) builds without caching."""
    try:
        value = cache.get(key)
    except TypeError:
        return build(*args)
    if value is None:
        value = build(*args)
        if len(cache) >= MAX_ENTRIES:
            cache.clear()
        cache[key] = value
    return value


# Scratch sets larger than this are allocated per call: their kernels take long enough
# that the allocation's host time does not show, and the memory goes back to the pool.
SCRATCH_MAX_BYTES = 16 << 20


def scratch(store: dict, like: torch.Tensor, make: Callable[[], tuple]) -> tuple:
    """The scratch tensors of one plan, made by ``make()`` once and then reused from
    ``store`` (the plan's own dict), per thread and per CUDA stream. Scratch is what the
    kernels of one op call write and read back and the op never returns: statistics
    partials, merge levels, split-K partials (a tuple of tensors, possibly nested). A
    launcher that hands its scratch to the caller (the conv's statistics partials) says
    so: it is valid until the next call of the same plan on the same stream.

    Reuse is safe because the kernels that use a scratch set run in stream order: a
    later call on the same stream cannot overwrite it before the earlier call's kernels
    are done, and calls on other streams or threads get sets of their own. While a CUDA
    graph is being captured every call gets fresh tensors (from the graph's private
    pool), so that no captured kernel reads a set that a cache clear could free. A set
    over :data:`SCRATCH_MAX_BYTES` is never kept.
    """
    if like.is_cuda:  # (cheaper than like.device.type)
        if torch.cuda.is_current_stream_capturing():
            return make()
        # The device index too: the default stream's handle is 0 on every device.
        index = like.get_device()
        slot = (threading.get_ident(), index, torch._C._cuda_getCurrentRawStream(index))
    else:
        slot = (threading.get_ident(), like.device)
    tensors = store.get(slot)
    if tensors is None:
        tensors = make()
        if _nbytes(tensors) <= SCRATCH_MAX_BYTES:
            store[slot] = tensors
    return tensors


def _nbytes(tensors: tuple) -> int:
    """Bytes of a (nested) tuple of tensors."""
    return sum(_nbytes(t) if isinstance(t, tuple) else t.numel() * t.element_size() for t in tensors)


def cuda_index(t: torch.Tensor) -> int:
    """The CUDA device index of ``t``, -1 when it is not a CUDA tensor."""
    return t.get_device() if t.is_cuda else -1


def current_cuda_index() -> int:
    """The current CUDA device's index. Only called with a CUDA tensor in hand, so CUDA is
    initialized: torch.cuda.current_device() without its lazy-init check."""
    return torch._C._cuda_getDevice()


def cuda_device(index: int):
    """A context making CUDA device ``index`` current."""
    return torch.cuda.device(index)


class Launch:
    """One kernel launch with everything but its tensors fixed: the kernel, the grid
    (a tuple, or a function of the config for an autotuned kernel), the trailing scalar
    arguments (sizes, strides, flags) and the constexprs, all functions of a launch-cache
    key. Built once per key, then called with the tensor arguments alone, which the
    kernels all take first:

        launch = Launch(kernels.bn_fwd_apply, grid, (*geom.args(), eps), HAS_W=True, ...)
        launch(x, out, mean, rstd, weight, bias, residual)

    A launch runs with its first tensor's CUDA device current (a guard entered only
    when another device is current: one device check per call on the host otherwise).
    The first call goes through the kernel's ``run``; later calls go straight to what it
    resolved to (:meth:`vhist.kernels._config.TunedKernel.resolve`: on a GPU, the kernel
    with the tuned pick's constexprs, without the per-call tuning-key lookup). Calls look
    ``run`` up each time, so that a launch built before
    :func:`vhist.tools.launches.record_launches` patched it still goes through the patch
    (the launch caches are cleared there anyway).
    """

    __slots__ = ("kernel", "tail", "options", "runner", "runner_options", "scratch")

    def __init__(self, kernel, grid, tail: tuple = (), **constexprs):
        self.kernel = kernel
        self.tail = tuple(tail)
        self.options = dict(constexprs, grid=grid, warmup=False)
        self.runner = self.runner_options = None
        self.scratch: dict = {}  # the launch's scratch sets (:func:`scratch`), when it has any

    def __call__(self, *tensors):
        # Triton launches on the current device: make the first tensor's current (the
        # launchers pass tensors of one device, checked at the op boundary).
        index = cuda_index(tensors[0])
        if index >= 0 and index != current_cuda_index():
            with cuda_device(index):
                return self._launch(tensors)
        return self._launch(tensors)

    def _launch(self, tensors):
        if self.runner is not None:
            return self.runner.run(*tensors, *self.tail, **self.runner_options)
        args = (*tensors, *self.tail)
        result = self.kernel.run(*args, **self.options)
        resolve = getattr(self.kernel, "resolve", None)
        resolved = resolve(args, self.options) if resolve is not None else (self.kernel, self.options)
        if resolved is not None:
            self.runner, self.runner_options = resolved
        return result

