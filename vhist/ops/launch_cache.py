"""Per-shape caches of the launchers' host work.

Everything a launcher derives from shapes, strides, dtypes, the device and its
hyper-parameters alone (validated conv geometry, channel chunkings, compile options)
is computed once per distinct key and then looked up: a training step repeats the same
few dozen keys hundreds of times. Keys are small tuples of ints, ``torch.Size``,
dtypes and devices; a list is keyed as a tuple, and symbolic sizes (``torch.compile``
with dynamic shapes, fake tensors) skip the cache.

:func:`clear` empties every cache; :func:`vhist.tools.launches.record_launches` calls
it on entry and exit, since the SM count the launchers see changes there.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

_CACHES: list[dict] = []
MAX_ENTRIES = 4096  # a cache that grows past this (shape churn) starts over


def hashable(value):
    """``value`` with lists turned into tuples, recursively."""
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    return value


def shape_cached(fn: Callable) -> Callable:
    """Memoizes ``fn`` on its arguments (keywords bound to positions, lists keyed as tuples). Arguments
    that cannot be hashed (symbolic sizes while tracing) bypass the cache. Exceptions
    are not cached: a bad argument raises every time."""
    cache: dict = {}
    _CACHES.append(cache)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def cached(*args, **kwargs):
        if kwargs:  # keyed positionally, so that f(a, b=1) and f(a, 1) share an entry
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args = bound.args
        try:
            return cache[args]
        except KeyError:
            pass
        except TypeError:  # a list (keyed as a tuple), or a symbolic size (not cached)
            key = tuple(hashable(a) for a in args)
            try:
                if key in cache:
                    return cache[key]
            except TypeError:
                return fn(*args)
            args = key
        value = fn(*args)
        if len(cache) >= MAX_ENTRIES:
            cache.clear()
        cache[args] = value
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
