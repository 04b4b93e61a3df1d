"""Model registry: ``@register_model`` entrypoints with their default configuration,
:func:`create_model`, :func:`list_models`, :func:`model_config`."""
from __future__ import annotations

import difflib
import fnmatch
import logging
from dataclasses import dataclass
from typing import Callable

from torch import nn

from vhist.models.initialization import check_init, initialize


@dataclass(frozen=True)
class ModelConfig:
    """What a model's registration records, as timm's default configs do.

    Attributes:
        image_size: the paper's input resolution, used when ``image_size`` is None.
        small_below: inputs smaller than this switch the stem to the family's
            small-input (CIFAR-style) variant.
    """

    image_size: int = 224
    small_below: int = 64


_MODELS: dict[str, Callable[..., nn.Module]] = {}
_CONFIGS: dict[str, ModelConfig] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, image_size: int = 224, small_below: int = 64):
    """Registers an entrypoint under its function name, with its default configuration.

    Used bare (``@register_model``: 224 px, small stem below 64) or with the model's
    values (``@register_model(image_size=299, small_below=75)``). Entrypoints take
    ``num_classes``, ``image_size`` and model-specific keyword arguments.
    """
    def register(entry: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = entry.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = entry
        _CONFIGS[name] = ModelConfig(image_size, small_below)
        return entry

    return register(fn) if fn is not None else register


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, filtered by a shell-style ``pattern``."""
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def unknown_model_message(name: str) -> str:
    """``unknown model 'x'`` with the closest registered names (difflib)."""
    close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.6)
    family = [n for n in sorted(_MODELS) if name.split("_")[0] and n.startswith(name.split("_")[0])]
    close += [n for n in family if n not in close][:max(0, 5 - len(close))]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"unknown model {name!r}; {hint}`vhist models` lists them all"


def model_config(name: str) -> ModelConfig:
    """The default configuration ``name`` was registered with.

    Raises:
        ValueError: for an unknown name (the message lists close matches).
    """
    if name not in _MODELS:
        raise ValueError(unknown_model_message(name))
    return _CONFIGS[name]


def create_model(name: str, num_classes: int = 1000, image_size: int | None = None, *, init: str | None = None,
                 pretrained: str | None = None, features_only: bool = False, out_indices=None,
                 **kwargs) -> nn.Module:
    """Builds the registered model ``name``; the model's ``default_config`` attribute
    holds its :class:`ModelConfig`.

    Args:
        name: a name from :func:`list_models`.
        num_classes: size of the classifier output.
        image_size: input resolution; None selects the paper's default. Small sizes
            (down to 32) switch the stem to the family's documented small-input variant.
        init: ``"paper"``, ``"modern"`` or ``"torch"`` (:mod:`vhist.models.initialization`);
            None keeps the family's own initialization.
        pretrained: a torchvision or timm checkpoint file to load
            (:func:`vhist.models.pretrained.load_pretrained`: strict but for a classifier
            of another ``num_classes``, which keeps its initialization).
        features_only: return a :class:`vhist.models.features.FeatureListNet`, whose
            forward gives each stage's feature map (timm's ``features_only``).
        out_indices: with ``features_only``, the stages to return (None: all).
        **kwargs: passed to the model's entrypoint.

    Raises:
        ValueError: for an unknown name (the message lists close matches), an unknown
            ``init``, ``init="paper"`` for a model without one, weights that do not fit,
            or ``out_indices`` without ``features_only`` or out of range.
        FileNotFoundError: a ``pretrained`` file that does not exist.
    """
    config = model_config(name)
    if out_indices is not None and not features_only:
        raise ValueError("out_indices selects feature maps: it needs features_only=True")
    if init is not None:
        check_init(init)
    model = _MODELS[name](num_classes=num_classes, image_size=image_size or config.image_size, **kwargs)
    if init is not None:
        initialize(model, init)
    model.default_config = config
    if pretrained is not None:
        from vhist.models.pretrained import load_pretrained

        # As timm, the load (and a re-initialized classifier) is logged; vhist train prints it.
        logging.getLogger(__name__).info(load_pretrained(model, pretrained).message())
    if features_only:
        from vhist.models.features import FeatureListNet

        model = FeatureListNet(model, out_indices, image_size or config.image_size)
        model.default_config = config
    return model
