"""Model registry: ``@register_model`` entrypoints, :func:`create_model`, :func:`list_models`."""
from __future__ import annotations

import fnmatch
from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers ``fn`` under its function name. Entrypoints take ``num_classes``,
    ``image_size`` (None for the paper's size) and model-specific keyword arguments."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, filtered by a shell-style ``pattern``."""
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def create_model(name: str, num_classes: int = 1000, image_size: int | None = None, **kwargs) -> nn.Module:
    """Builds the registered model ``name``.

    Args:
        name: a name from :func:`list_models`.
        num_classes: size of the classifier output.
        image_size: input resolution; None selects the paper's default. Small sizes
            (down to 32) switch the stem to the family's documented small-input variant.
        **kwargs: passed to the model's entrypoint.

    Raises:
        ValueError: for an unknown name (the message lists close matches).
    """
    if name not in _MODELS:
        close = [n for n in _MODELS if name.split("_")[0] in n][:8]
        raise ValueError(f"unknown model {name!r}; " + (f"did you mean one of {close}? " if close else "")
                         + "see vhist.list_models()")
    return _MODELS[name](num_classes=num_classes, image_size=image_size, **kwargs)
