"""``vhist eval``: a checkpoint's weights evaluated on one split of a dataset."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from vhist.train import checkpoint as ckpt
from vhist.train.data import EpochBatches, SampleSet, load_data, make_loader
from vhist.train.engine import evaluate
from vhist.train.setup import check_backend, parse_device


def evaluate_checkpoint(path: str, data_spec: Optional[str] = None, split: str = "test", batch_size: int = 128,
                        workers: Optional[int] = None, device: str = "auto", backend: Optional[str] = None) -> dict:
    """Loss, top-1 and top-5 of a checkpoint's weights on a split.

    The validation split is re-carved with the checkpoint's seed and fraction, so it is
    the one the run selected on.
    """
    import vhist
    from vhist.backend import use_backend

    state = ckpt.load(path)  # validated before anything else runs
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
        model = vhist.create_model(tc["model"], num_classes=state["num_classes"], image_size=size)
        if tc.get("sync_bn"):
            model = vhist.nn.convert_sync_batchnorm(model)
        model.load_state_dict(state["model"])
        model.to(dev)
        channels_last = dev.type == "cuda"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        w = (8 if dev.type == "cuda" else 0) if workers is None else workers
        loader = make_loader(SampleSet(src, idx, size, augment, False, tc["seed"]),
                             EpochBatches(len(idx), batch_size, tc["seed"], False), w, dev.type == "cuda")
        amp = torch.bfloat16 if dev.type == "cuda" else None
        result = evaluate(model, loader, dev, channels_last, amp, None, split)
    result["corrupt"] = len(result["corrupt"])
    return {"checkpoint": str(path), "split": split, "data": data.root, "model": tc["model"], **result}
