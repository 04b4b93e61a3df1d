"""Backbone features as timm's ``features_only`` gives them: a zoo model wrapped so that
its forward returns the feature map of each stage, described by a :class:`FeatureInfo`
(channels, reduction, module name) with timm's methods.

The stages are found, not listed by hand: each model names the modules whose outputs are
candidate stage outputs (``feature_modules()``, in forward order); forwards on fake
tensors (nothing computed or allocated) record their shapes, and the last candidate of
each run of equal reduction is a stage, so that every resolution the network passes
through gives one map, as timm's ``feature_info`` does (ResNet: the stem at 2, then the
four layers at 4, 8, 16, 32). A ViT keeps every block (timm's ViT ``feature_info``), each
at the patch size, as a (B, D, H, W) map.
The outputs are taken with forward hooks on those modules while ``forward_features`` runs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

# Two probes this many pixels apart give each stage's nominal reduction (probe_stages);
# a multiple of every total stride in the zoo (at most 32).
PROBE_STEP = 256


class FeatureInfo:
    """timm's ``FeatureInfo``: one dict per stage (``num_chs``, ``reduction``,
    ``module``) and the stages selected by ``out_indices``."""

    def __init__(self, feature_info: list[dict], out_indices: Sequence[int]):
        self.info = feature_info
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: Optional[int | Sequence[int]] = None):
        """``key`` of the selected stages (``idx`` None), of stage ``idx``, or of a list of stages."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Optional[Sequence[str]] = None, idx=None):
        """The stage dicts (restricted to ``keys``) of the selected stages or of ``idx``."""
        indices = self.out_indices if idx is None else idx
        pick = (lambda d: d) if keys is None else (lambda d: {k: d[k] for k in keys})
        if isinstance(indices, (tuple, list)):
            return [pick(self.info[i]) for i in indices]
        return pick(self.info[indices])

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


def _as_tensor(x):
    from vhist.nn.functional import as_tensor

    return as_tensor(x)


def _stage_shapes(model: nn.Module, image_size: int) -> dict[str, tuple]:
    """The output shape of each candidate module that runs, in the order they run, from
    one eval forward at ``image_size`` on fake tensors with the torch backend."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vhist.backend import use_backend

    modules = dict(model.named_modules())
    shapes: dict[str, tuple] = {}

    def record(name, out) -> None:  # a hook that returned a value would replace the output
        shapes.setdefault(name, tuple(_as_tensor(out).shape))

    handles = [modules[name].register_forward_hook(lambda m, args, out, name=name: record(name, out))
               for name in model.feature_modules() if modules.get(name) is not None]
    training = model.training
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), use_backend("torch"), torch.no_grad():
            model.eval().forward_features(torch.empty(1, 3, image_size, image_size))
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return shapes


def probe_stages(model: nn.Module, image_size: int) -> list[dict]:
    """The stages of ``model`` at ``image_size`` (module docstring). The reduction is the
    nominal one (the product of the strides, as timm reports it), read off two forwards
    ``PROBE_STEP`` pixels apart: each stride-s layer maps an input ``PROBE_STEP`` larger to
    an output ``PROBE_STEP / s`` larger, whatever its padding (the Inceptions' unpadded
    convs leave 299 / 35 = 8.5 at a nominal 8)."""
    shapes = _stage_shapes(model, image_size)
    larger = _stage_shapes(model, image_size + PROBE_STEP) if any(len(s) == 4 for s in shapes.values()) else {}
    stages: list[dict] = []
    for name, shape in shapes.items():  # in the order the forward reached them
        if len(shape) == 3:  # ViT tokens (B, 1 + HW, D): every block is a stage
            stages.append(dict(num_chs=shape[2], reduction=model.patch_size, module=name))
            continue
        reduction = PROBE_STEP // (larger[name][-1] - shape[-1])
        if stages and stages[-1]["reduction"] == reduction:
            stages.pop()
        stages.append(dict(num_chs=shape[1], reduction=reduction, module=name))
    return stages


class FeatureListNet(nn.Module):
    """A zoo model whose forward returns the list of its selected stages' feature maps
    (timm's ``FeatureListNet``). The classifier modules are replaced by ``nn.Identity``.

    Args:
        model: a zoo model (it has ``feature_modules`` and ``forward_features``).
        out_indices: the stages to return, indices into ``feature_info.info``
            (negative ones count from the end); None: all.
        image_size: the input size the model was built for (the stages are probed at it).
    """

    def __init__(self, model: nn.Module, out_indices: Optional[Sequence[int]], image_size: int):
        super().__init__()
        info = probe_stages(model, image_size)
        count = len(info)
        indices = tuple(range(count)) if out_indices is None else tuple(out_indices)
        bad = [i for i in indices if not isinstance(i, int) or not -count <= i < count]
        if bad or not indices:
            raise ValueError(f"out_indices {tuple(out_indices)} out of range: {type(model).__name__} has {count} "
                             f"stages (reductions {[s['reduction'] for s in info]})")
        self.feature_info = FeatureInfo(info, [i % count for i in indices])
        classifier = getattr(model, "pretrained_keys", {}).get("classifier", ())
        for name in (classifier,) if isinstance(classifier, str) else classifier:
            if dict(model.named_modules()).get(name) is not None:
                model.set_submodule(name, nn.Identity())
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # Hooks live for one forward only, so that a copy of this module (deepcopy, an
        # EMA) records into its own dict rather than into the original's.
        outputs: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())
        handles = [modules[name].register_forward_hook(
            lambda m, args, out, name=name: outputs.__setitem__(name, out))
            for name in set(self.feature_info.module_name())]
        try:
            self.model.forward_features(x)
        finally:
            for h in handles:
                h.remove()
        maps = []
        for name in self.feature_info.module_name():
            out = _as_tensor(outputs[name])
            maps.append(self.model.tokens_to_map(out) if out.dim() == 3 else out)
        return maps
