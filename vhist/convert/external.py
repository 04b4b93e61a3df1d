"""Models named ``torchvision:NAME`` or ``timm:NAME`` for the CLI (``vhist train / eval /
convert``): built by that library, then converted with :func:`vhist.convert`; zoo names
go to :func:`vhist.create_model` unchanged."""
from __future__ import annotations

import importlib
from typing import Optional

from torch import nn

from vhist.convert.model import convert
from vhist.models import ModelConfig, create_model, model_config

LIBRARIES = ("torchvision", "timm")


def is_external(spec: str) -> bool:
    """Whether ``spec`` names a torchvision or timm model (``LIBRARY:NAME``)."""
    return ":" in spec and spec.split(":", 1)[0] in LIBRARIES


def _library(spec: str):
    library, name = spec.split(":", 1)
    if not name:
        raise ValueError(f"model {spec!r}: give a name after '{library}:'")
    try:
        return importlib.import_module(library), name
    except Exception as exc:  # noqa: BLE001  (torchvision beside a mismatched torch fails in many ways)
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ValueError(f"model {spec!r} needs the package {library}, which does not import here "
                         f"({reason}); install {library} built for this torch") from None


def check_model(spec: str) -> ModelConfig:
    """The configuration of the zoo model or ``LIBRARY:NAME`` spec (the library must import).

    Raises:
        ValueError: an unknown zoo name, or a library that does not import.
    """
    if not is_external(spec):
        return model_config(spec)
    _library(spec)
    return ModelConfig()


def build(spec: str, num_classes: int = 1000, image_size: Optional[int] = None, *, converted: bool = True,
          **kwargs) -> nn.Module:
    """The zoo model ``spec``, or the torchvision / timm model it names, converted (or as
    the library builds it, with ``converted=False``: the baseline of a benchmark).

    Raises:
        ValueError: an unknown name, or a library that does not import.
    """
    if not is_external(spec):
        return create_model(spec, num_classes=num_classes, image_size=image_size, **kwargs)
    library, name = _library(spec)
    try:
        if library.__name__ == "torchvision":
            model = library.models.get_model(name, num_classes=num_classes, **kwargs)
        else:
            model = library.create_model(name, num_classes=num_classes, **kwargs)
    except (KeyError, RuntimeError) as exc:
        raise ValueError(f"model {spec!r}: {' '.join(str(exc).split())}") from None
    if converted:
        model = convert(model, inplace=True, input_size=image_size or 224)
    model.default_config = ModelConfig(image_size=image_size or 224)
    return model


__all__ = ["LIBRARIES", "build", "check_model", "is_external"]
