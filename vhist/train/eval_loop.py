"""The evaluation loop shared by training (validation and test splits,
:mod:`vhist.train.engine`) and by ``vhist eval`` (:mod:`vhist.train.evaluation`)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from vhist.train import distributed as D
from vhist.train.metrics import progress_bar
from vhist.train.transforms import device_augment, normalize


@torch.no_grad()
def evaluate(model, loader, device, channels_last: bool, amp_dtype, cached_augment: Optional[tuple] = None,
             desc: str = "eval", dist: D.DistInfo = D.DistInfo()) -> dict:
    """Loss, top-1 and top-5 (%) of ``model`` over ``loader``, summed over all processes."""
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    corrupt = []
    bar = progress_bar(len(loader), desc, dist.is_main)
    for images, labels, bad in loader:
        corrupt += bad
        bar.update(1)
        if images is None:
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if cached_augment is not None:
            kind, size = cached_augment
            images = device_augment(images, kind, size, np.random.default_rng(0), train=False)
        x = normalize(images, channels_last=channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += labels.numel()
    bar.close()
    loss_sum, correct1, correct5, count = D.all_sum([loss_sum, correct1, correct5, count], device)
    if count == 0:
        return {"loss": None, "top1": None, "top5": None, "count": 0, "corrupt": corrupt}
    return {"loss": loss_sum / count, "top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count,
            "count": int(count), "corrupt": corrupt}
