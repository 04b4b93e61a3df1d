"""``vhist eval``: a checkpoint's weights evaluated on one split of a dataset, with
optional test-time augmentation (``--tta flip | 10crop``).

Test-time augmentation averages the softmax probabilities of several views of each
image, as AlexNet did (Krizhevsky et al. 2012, §4.1: "averaging the predictions made by
the network's softmax layer on the ten patches"); the loss reported with it is the
cross-entropy of the averaged probabilities.

* ``flip``: the single-crop view (the evaluation transform) and its horizontal mirror.
* ``10crop``: the image's shorter side is resized to ``round(size / 0.875)`` (256 for
  224, AlexNet's 256 x 256) and its centre square of that side is kept; the views are
  the four ``size`` x ``size`` corner patches, the centre patch, and the mirrors of all
  five. Images smaller than that square (CIFAR's 32 px at 32) are upsampled to it.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vhist.train import checkpoint as ckpt
from vhist.train.data import EpochBatches, SampleSet, load_data, make_loader
from vhist.train.eval_loop import evaluate
from vhist.train.setup import check_backend, parse_device
from vhist.train.transforms import EVAL_CROP_FRACTION, center_crop, resize_shorter

TTA_MODES = ("flip", "10crop")


def ten_crop_offsets(side: int, size: int) -> list[tuple[int, int]]:
    """``(top, left)`` of AlexNet's five patches of ``size`` in a ``side`` x ``side``
    image: top-left, top-right, bottom-left, bottom-right, centre."""
    if size > side:
        raise ValueError(f"10-crop patches of {size} px do not fit a {side} px image")
    far, mid = side - size, (side - size) // 2
    return [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]


def tta_views(x: torch.Tensor, mode: str, size: int) -> torch.Tensor:
    """The views of a batch ``x`` (N, C, S, S), stacked view-major: (V*N, C, size, size).

    ``flip``: ``x`` (S = size) and its mirror (V = 2). ``10crop``: the five patches of
    :func:`ten_crop_offsets`, then their mirrors in the same order (V = 10)."""
    if mode == "flip":
        if x.shape[-1] != size or x.shape[-2] != size:
            raise ValueError(f"flip TTA takes {size} px batches, got {tuple(x.shape)}")
        return torch.cat([x, x.flip(-1)])
    if mode == "10crop":
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"10-crop TTA takes square batches, got {tuple(x.shape)}")
        crops = [x[..., t:t + size, l:l + size] for t, l in ten_crop_offsets(x.shape[-1], size)]
        return torch.cat(crops + [c.flip(-1) for c in crops])
    raise ValueError(f"unknown TTA mode {mode!r}; choose from {', '.join(TTA_MODES)}")


class TTAModel(torch.nn.Module):
    """Wraps a classifier: the log of its softmax averaged over :func:`tta_views`.

    Its output goes wherever logits do: ``argmax``/``topk`` of it rank classes by the
    averaged probability, and ``cross_entropy`` of it is the negative log of the
    averaged probability of the label (log-softmax of a log-probability is itself)."""

    def __init__(self, model: torch.nn.Module, mode: str, size: int):
        super().__init__()
        if mode not in TTA_MODES:
            raise ValueError(f"unknown TTA mode {mode!r}; choose from {', '.join(TTA_MODES)}")
        self.model, self.mode, self.size = model, mode, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        views = tta_views(x, self.mode, self.size)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            views = views.contiguous(memory_format=torch.channels_last)
        probs = self.model(views).float().softmax(dim=1)
        return probs.view(-1, n, probs.shape[1]).mean(dim=0).clamp_min(1e-12).log()


def ten_crop_side(size: int) -> int:
    """The side of the square the ten patches are taken from (256 for 224)."""
    return round(size / EVAL_CROP_FRACTION)


class SquareResized:
    """A source whose images are resized (shorter side to ``side``) and centre-cropped
    to ``side`` x ``side``: the base image of the 10 patches."""

    def __init__(self, source, side: int):
        self.source, self.side, self.labels = source, side, source.labels

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int):
        img, bad = self.source.load(index)
        if img is None:
            return None, bad
        return np.ascontiguousarray(center_crop(resize_shorter(img, self.side), self.side)), None


def evaluate_checkpoint(path: str, data_spec: Optional[str] = None, split: str = "test", batch_size: int = 128,
                        workers: Optional[int] = None, device: str = "auto", backend: Optional[str] = None,
                        tta: Optional[str] = None) -> dict:
    """Loss, top-1 and top-5 of a checkpoint's weights on a split.

    The validation split is re-carved with the checkpoint's seed and fraction, so it is
    the one the run selected on. ``tta`` (``flip`` or ``10crop``) averages the softmax
    over those views (module doc); ``batch_size`` counts images, each run as V views.
    """
    import vhist
    from vhist.backend import use_backend

    state = ckpt.load(path)  # validated before anything else runs
    if tta is not None and tta not in TTA_MODES:
        raise ValueError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    dev = parse_device(device)
    with use_backend(backend) if backend else contextlib.nullcontext():
        check_backend(dev, backend)
    tc = state["train_config"]
    data = load_data(data_spec or tc["data"], tc["val_fraction"], tc["seed"])
    if data.num_classes != state["num_classes"]:
        raise ValueError(f"{data.root} has {data.num_classes} classes; the checkpoint was trained on "
                         f"{state['num_classes']}")
    size, augment = state["image_size"], state["recipe"]["augment"]
    src, idx = {"train": (data.train, data.train_idx), "val": (data.train, data.val_idx),
                "test": (data.test, data.test_idx)}[split]
    context = use_backend(backend) if backend else contextlib.nullcontext()
    with context:
        model = ckpt.build_model(state)
        if tc.get("sync_bn"):
            model = vhist.nn.convert_sync_batchnorm(model)
        model.to(dev)
        channels_last = dev.type == "cuda"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        w = (8 if dev.type == "cuda" else 0) if workers is None else workers
        if tta == "10crop":
            samples = SampleSet(SquareResized(src, ten_crop_side(size)), idx, size, augment, False, tc["seed"],
                                raw=True)
        else:
            samples = SampleSet(src, idx, size, augment, False, tc["seed"])
        loader = make_loader(samples, EpochBatches(len(idx), batch_size, tc["seed"], False), w, dev.type == "cuda")
        amp = torch.bfloat16 if dev.type == "cuda" else None
        net = TTAModel(model, tta, size) if tta else model
        result = evaluate(net, loader, dev, channels_last, amp, None, split if not tta else f"{split} ({tta})")
    result["corrupt"] = len(result["corrupt"])
    out = {"checkpoint": str(path), "split": split, "data": data.root, "model": tc["model"], **result}
    if tta:
        out["tta"] = tta
    return out


def record_tta(result: dict) -> Optional[Path]:
    """Adds a test-split TTA result to ``summary.json`` of the checkpoint's run folder,
    under ``test_tta[mode]``, beside (never over) the single-crop ``test_top1``.

    Only a completed run's own ``best.pt`` (the weights its test numbers come from),
    evaluated on the data at the path the run trained on (``config.json``), is
    recorded. Returns the summary's path, or None when nothing was recorded."""
    path = Path(result["checkpoint"]).resolve()
    summary_path, config_path = path.parent / "summary.json", path.parent / "config.json"
    if result.get("tta") is None or result["split"] != "test" or path.name != "best.pt" \
            or not summary_path.is_file() or not config_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    trained_on = json.loads(config_path.read_text()).get("data", {}).get("root")
    if summary.get("status") != "completed" or trained_on != result["data"]:
        return None
    summary.setdefault("test_tta", {})[result["tta"]] = {
        "mode": result["tta"], "top1": result["top1"], "top5": result["top5"], "loss": result["loss"],
        "images": result["count"], "checkpoint": "best.pt"}
    tmp = summary_path.with_name(f".{summary_path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, summary_path)
    return summary_path
