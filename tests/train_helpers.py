"""Tiny models and tiny generated datasets for the training tests."""
from __future__ import annotations

import os
import pickle
import signal
import socket

import numpy as np
import pytest
import torch
from torch import nn

import vhist
from vhist.models import list_models, register_model

# Settable by the tests: the training forward call at which a model misbehaves.
HOOKS = {"nan_at": None, "interrupt_at": None, "sigint_at": None, "calls": 0}


class TinyNet(nn.Module):
    """Conv → vhist BatchNorm2d → ReLU → fused ConvBNAct → pool → dropout → linear."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = vhist.nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = vhist.nn.BatchNorm2d(6)
        self.block = vhist.nn.ConvBNAct(6, 6, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(6 * 4, num_classes)

    def forward(self, x):
        if self.training:
            HOOKS["calls"] += 1
            if HOOKS["interrupt_at"] is not None and HOOKS["calls"] == HOOKS["interrupt_at"]:
                raise KeyboardInterrupt
            if HOOKS["sigint_at"] is not None and HOOKS["calls"] == HOOKS["sigint_at"]:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered mid-step
        x = self.block(torch.relu(self.bn(self.conv(x))))
        x = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        out = self.fc(self.drop(x))
        if self.training and HOOKS["nan_at"] is not None and HOOKS["calls"] >= HOOKS["nan_at"]:
            out = out * float("nan")
        return out


def register_tiny(name: str, cls) -> None:
    """Registers ``cls(num_classes)`` as zoo model ``name`` (once per process)."""
    def entry(num_classes=10, image_size=None, **kwargs):
        return cls(num_classes)

    entry.__name__ = name
    if name not in list_models():
        register_model(entry)


register_tiny("tiny_train_net", TinyNet)


def reset_hooks():
    HOOKS.update(nan_at=None, interrupt_at=None, sigint_at=None, calls=0)


@pytest.fixture(autouse=True)
def one_thread_fresh_hooks():
    """Autouse in the modules that import it: one intra-op thread (these models are tiny,
    and threads only contend on a shared CI box) and no misbehaviour hook left set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_hooks()
    yield
    reset_hooks()
    torch.set_num_threads(threads)


def class_images(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Learnable images: a class colour plus noise, uint8 (N, size, size, 3)."""
    rng = np.random.default_rng(seed)
    colours = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [200, 200, 40]], dtype=np.float64)
    img = colours[labels % 4][:, None, None, :] + rng.normal(0, 25, size=(len(labels), size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_cifar10(root, per_batch: int = 12, n_test: int = 16, classes: int = 4) -> str:
    """A cifar-10-batches-py folder in the real pickle format (tiny)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        labels = np.arange(n) % classes
        data = class_images(labels, 32, seed=i).transpose(0, 3, 1, 2).reshape(n, 3072)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist(), b"batch_label": name.encode()}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(classes)]}, f)
    return folder


def write_image_folder(root, per_class: int = 8, n_test: int = 3, classes: int = 3, size: int = 20,
                       corrupt: int = 0) -> str:
    """An Imagenette-style tree ROOT/{train,val}/<wnid>/*.JPEG of tiny JPEGs."""
    from PIL import Image

    base = os.path.join(root, "imagenette2-160")
    wnids = [f"n0{1440764 + i}" for i in range(classes)]
    for split, n in (("train", per_class), ("val", n_test)):
        for c, wnid in enumerate(wnids):
            os.makedirs(os.path.join(base, split, wnid), exist_ok=True)
            imgs = class_images(np.full(n, c), size + c, seed=c + (0 if split == "train" else 100))
            for k in range(n):
                Image.fromarray(imgs[k]).save(os.path.join(base, split, wnid, f"{wnid}_{k}.JPEG"), quality=95)
    for k in range(corrupt):
        with open(os.path.join(base, "train", wnids[0], f"broken_{k}.JPEG"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PairNet(nn.Module):
    """A (Conv2d, BatchNorm2d) pair run through the functional fused ``conv_bn_act``."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = vhist.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = vhist.nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        x = vhist.nn.conv_bn_act(self.conv, self.bn, x, "relu")
        return self.fc(x.mean((2, 3)))


register_tiny("tiny_pair_net", PairNet)


class DirectFusedNet(PairNet):
    """Calls the fused functional op on its BatchNorm's tensors directly, bypassing the
    BatchNorm module: a SyncBatchNorm there would never synchronize."""

    def forward(self, x):
        bn = self.bn
        x = vhist.nn.functional.fused_conv_bn_relu(
            x, self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
            padding=1, training=self.training)
        return self.fc(x.mean((2, 3)))


register_tiny("tiny_direct_fused_net", DirectFusedNet)
