"""Weight initialization schemes: ``create_model(name, init=...)`` and the recipes' ``init``.

Without ``init`` a model keeps the initialization its family module gives it (the state
every earlier release built). The schemes:

* ``paper``: what the family's paper did, or, where the paper states none, the authors'
  released reference code (the family's ``init_weights`` docstring says which);
* ``modern``: what torchvision and timm do for a network trained from scratch today:
  Kaiming-normal convs (fan_out, ReLU; He et al. 2015) with zero biases, norms at
  (1, 0), linear layers N(0, 0.01) with zero biases (torchvision's VGG, MobileNet and
  GoogLeNet heads); ViTs: timm's truncated normal (``init_weights_vit_timm``);
* ``torch``: PyTorch's own layer defaults (``reset_parameters``: Kaiming-uniform with
  a = sqrt(5) for convs and linears, uniform biases), what a plain PyTorch model gets and
  what the seed report's runs, which state no initialization, are assumed to have had.

A family that differs from the generic ``modern`` / ``torch`` or has a ``paper`` scheme
defines ``init_weights(scheme)``; :func:`initialize` calls it, else applies the generic
scheme, and refuses ``paper`` for a model without one.
"""
from __future__ import annotations

import math

from torch import nn

INITS = ("paper", "modern", "torch")
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def check_init(scheme: str) -> str:
    """``scheme`` if it is one of :data:`INITS`.

    Raises:
        ValueError: naming the schemes, for anything else.
    """
    if scheme not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {scheme!r}")
    return scheme


def initialize(model: nn.Module, scheme: str) -> nn.Module:
    """Re-initializes ``model``'s weights in place with ``scheme`` (module doc); returns it.

    Draws from the global torch generator, so a seeded run is reproducible.

    Raises:
        ValueError: an unknown scheme, or ``paper`` for a model with no paper scheme.
    """
    check_init(scheme)
    own = getattr(model, "init_weights", None)
    if callable(own):
        own(scheme)
    elif scheme == "paper":
        raise ValueError(f"{type(model).__name__} has no paper initialization; use init 'modern' or 'torch'")
    else:
        generic_init(model, scheme)
    return model


def generic_init(module: nn.Module, scheme: str) -> None:
    """The ``modern`` or ``torch`` scheme of the module doc, on any module."""
    if scheme == "torch":
        torch_defaults_(module)
    elif scheme == "modern":
        modern_(module)
    else:
        raise ValueError(f"no generic {scheme!r} initialization; use 'modern' or 'torch'")


def torch_defaults_(module: nn.Module) -> None:
    """PyTorch's layer defaults: every submodule's ``reset_parameters`` (BatchNorm's also
    resets its running statistics), then ``nn.MultiheadAttention``'s own rule (Xavier-uniform
    packed projection, zero biases), which its constructor applies after its ``out_proj``'s."""
    for m in module.modules():
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
    for m in module.modules():
        if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            nn.init.xavier_uniform_(m.in_proj_weight)
            if m.in_proj_bias is not None:
                nn.init.zeros_(m.in_proj_bias)
                nn.init.zeros_(m.out_proj.bias)


def norms_(module: nn.Module) -> None:
    """Every affine norm layer at weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def modern_(module: nn.Module) -> None:
    """torchvision's from-scratch CNN scheme (module doc): Kaiming-normal fan_out convs,
    norms (1, 0), linear N(0, 0.01), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    norms_(module)


def gaussian_(module: nn.Module, std: float, truncated: bool = False) -> None:
    """Every conv and linear weight N(0, std) (truncated at 2 std with ``truncated``,
    TensorFlow's ``truncated_normal_initializer``), zero biases; norms (1, 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if truncated:
                nn.init.trunc_normal_(m.weight, 0.0, std, -2 * std, 2 * std)
            else:
                nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    norms_(module)


def tf_slim_inception_(module: nn.Module) -> None:
    """The Inception papers state no initialization; their released TF-slim code
    (tensorflow/models ``research/slim/nets/inception_utils.py``, ``inception_arg_scope``)
    gives every conv ``variance_scaling_initializer()``: factor 2, fan_in, a normal
    truncated at 2 std with std sqrt(1.3 * 2 / fan_in) (the 1.3 makes up for the
    truncation); ``fully_connected`` keeps its default Xavier (Glorot) uniform; biases 0;
    BatchNorm at (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            std = math.sqrt(1.3 * 2.0 / fan_in)
            nn.init.trunc_normal_(m.weight, 0.0, std, -2 * std, 2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    norms_(module)


def inception_init(model: nn.Module, scheme: str) -> None:
    """``init_weights`` of the Inception families: ``paper`` is :func:`tf_slim_inception_`."""
    if scheme == "paper":
        tf_slim_inception_(model)
    else:
        generic_init(model, scheme)
