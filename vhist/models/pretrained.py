"""Pretrained weights from a file, as timm loads them: a torchvision or timm checkpoint
(``torch.save`` or ``.safetensors``; a state_dict, or one wrapped in ``state_dict_ema`` / ``model_ema`` / ``state_dict`` /
``model``, keys possibly prefixed with ``module.`` (DDP) or ``_orig_mod.``
(``torch.compile``)) loaded strictly into a zoo model, except:

* the classifier, when its shape differs (another ``num_classes``): it keeps the fresh
  model's initialization, and the load says so;
* the RGB stem, when the checkpoint's has another number of input channels: adapted as
  timm's ``adapt_input_conv`` does (:func:`adapt_input_conv`).

Each model names its stem and classifier in ``pretrained_keys`` (timm's
``pretrained_cfg`` fields ``first_conv`` and ``classifier``) and may map a foreign layout
onto its keys in ``filter_state_dict`` (timm's ``checkpoint_filter_fn``; the ViT maps
timm's keys onto torchvision's). Nothing is downloaded: the user gives the file.
"""
from __future__ import annotations

import json
import math
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# timm's ``load_state_dict(..., use_ema=True)`` order: the EMA weights when present.
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict held by the checkpoint file ``path``, unwrapped and unprefixed.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a torch file, or no state_dict in it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} do not exist" if not path.exists()
                                else f"pretrained weights {path} is a folder, not a file")
    try:
        obj = read_safetensors(path) if path.suffix == ".safetensors" else \
            torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"pretrained weights {path} cannot be read as a torch checkpoint ({detail})") from None
    if isinstance(obj, dict) and not _is_state_dict(obj):
        obj = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not obj or not _is_state_dict(obj):
        keys = f" (top-level keys: {', '.join(map(str, list(obj)[:6]))})" if isinstance(obj, dict) else ""
        raise ValueError(f"pretrained weights {path} hold no state_dict{keys}; expected a state_dict or one under "
                         f"{', '.join(WRAPPER_KEYS)}")
    return {_strip(k): v for k, v in obj.items()}


# safetensors dtype codes (https://github.com/huggingface/safetensors, format.md).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file (timm's Hugging Face Hub weights are published so), read
    without the safetensors package: an 8-byte little-endian header length, a JSON header
    of ``name: {dtype, shape, data_offsets}``, then the little-endian tensor bytes."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    length = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + length])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a safetensors header ({exc})") from None
    body = memoryview(data)[8 + length:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        flat = torch.frombuffer(bytearray(body[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(info["shape"])
    return out


def _is_state_dict(obj: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def adapt_input_conv(in_chans: int, conv_weight: torch.Tensor) -> torch.Tensor:
    """A stem's weight (O, I, KH, KW) adapted to ``in_chans`` input channels, with timm's
    ``adapt_input_conv`` rules: to 1 channel, the sum over the input channels (an RGB
    image of a gray scene then gives the RGB model's output); to any other count, the
    weight repeated along the input channels, cut to ``in_chans`` and scaled by
    ``I / in_chans``. timm takes I = 3 only; the same rule takes a 1-channel weight to
    RGB (each channel gets a third, so R = G = B gives the gray model's output)."""
    dtype = conv_weight.dtype
    weight = conv_weight.float()
    out_chans, chans, kh, kw = weight.shape
    if in_chans == chans:
        return conv_weight
    if in_chans == 1:
        if chans > 3:  # space-to-depth stems: sum each RGB triple
            if chans % 3:
                raise ValueError(f"cannot adapt a {chans}-channel stem to 1 channel (not a multiple of 3)")
            weight = weight.reshape(out_chans, chans // 3, 3, kh, kw).sum(dim=2)
        else:
            weight = weight.sum(dim=1, keepdim=True)
    else:
        if chans not in (1, 3):
            raise ValueError(f"cannot adapt a {chans}-channel stem to {in_chans} channels (from 1 or 3 only)")
        repeat = math.ceil(in_chans / chans)
        weight = weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (chans / in_chans)
    return weight.to(dtype)


@dataclass
class PretrainedLoad:
    """What :func:`load_pretrained` did."""

    path: str
    tensors: int
    reinitialized: list[str] = field(default_factory=list)  # classifier modules left at their fresh init
    stem_channels: int = 3                                   # input channels of the checkpoint's stem
    num_classes: tuple[int, int] | None = None               # (checkpoint's, model's) when they differ

    def message(self) -> str:
        text = f"pretrained: {self.tensors} tensors from {self.path}"
        if self.stem_channels != 3:
            text += f"; RGB stem adapted from the checkpoint's {self.stem_channels}-channel one"
        if self.reinitialized:
            theirs, ours = self.num_classes
            text += (f"; classifier {', '.join(self.reinitialized)} re-initialized for {ours} classes "
                     f"(the checkpoint's has {theirs})")
        return text


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def load_pretrained(model: nn.Module, path: str | Path) -> PretrainedLoad:
    """Loads the checkpoint file ``path`` into the zoo model ``model`` (module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, or the weights of another architecture or size (the
            message counts the missing, unexpected and mis-shaped tensors).
    """
    state = read_state_dict(path)
    if callable(getattr(model, "filter_state_dict", None)):
        state = model.filter_state_dict(state)
    own = model.state_dict()
    keys = getattr(model, "pretrained_keys", {})
    report = PretrainedLoad(str(path), 0)
    first_conv = keys.get("first_conv")
    stem = f"{first_conv}.weight"
    if first_conv and stem in state and stem in own and state[stem].dim() == 4 and own[stem].dim() == 4 \
            and state[stem].shape[1] != own[stem].shape[1] and state[stem].shape[2:] == own[stem].shape[2:]:
        report.stem_channels = state[stem].shape[1]
        state[stem] = adapt_input_conv(own[stem].shape[1], state[stem])
    classifier, kept = keys.get("classifier", ()), 0
    for name in (classifier,) if isinstance(classifier, str) else classifier:
        weight = f"{name}.weight"
        if weight in state and weight in own and state[weight].shape != own[weight].shape:
            report.reinitialized.append(name)
            report.num_classes = (state[weight].shape[0], own[weight].shape[0])
            for key in (weight, f"{name}.bias"):
                if key in own:
                    state[key] = own[key]
                    kept += 1
    for key in own:  # checkpoints older than torch 0.4.1 have no BN batch counters
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = own[key]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
              if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{len(missing)} missing ({_examples(missing)})" if missing else "",
                    f"{len(unexpected)} unexpected ({_examples(unexpected)})" if unexpected else "",
                    f"{len(shapes)} of another shape ({_examples(shapes)})" if shapes else ""]
        raise ValueError(f"pretrained weights {path} do not fit this {type(model).__name__}: "
                         + "; ".join(p for p in problems if p)
                         + " tensors; are they another architecture's, or for another --image-size?")
    model.load_state_dict(state, strict=True)
    report.tensors = len(state) - kept
    return report
