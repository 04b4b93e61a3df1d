"""Image augmentation, on uint8 HWC numpy arrays (CPU loader) or on uint8 NCHW batches
already on the device (the cached loader).

Every random draw comes from a generator passed in by the caller, seeded from
(seed, epoch, sample or batch index): the augmentation of a sample never depends on the
worker that decodes it, nor on where a run was resumed.

Kinds:

* ``alexnet``: Krizhevsky et al. 2012, §4.1: resize the shorter side to 256/224 of the
  crop, take a random crop and a random horizontal flip, and add the PCA colour shift
  ``[p1 p2 p3][a1 l1, a2 l2, a3 l3]^T`` with ``a_i ~ N(0, 0.1)`` (eigen-decomposition of
  the RGB covariance of ImageNet pixels).
* ``rrc``: Szegedy et al. 2015 (GoogLeNet) crops as popularized by torchvision: a
  random region of 8%–100% of the area and aspect ratio 3/4–4/3, resized, plus a flip.
* ``cifar``: He et al. 2016, §4.2: pad 4 pixels with zeros, take a random crop of the
  original size, random horizontal flip.
* ``none``: the evaluation transform only.

Evaluation always resizes the shorter side to ``size / 0.875`` and takes the centre crop
(for images already at ``size`` and no larger, e.g. CIFAR, the image is unchanged).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

AUGMENTATIONS = ("alexnet", "rrc", "cifar", "none")

# ImageNet RGB statistics, pixel values in [0, 1] (AlexNet's PCA lighting values as
# published with fb.resnet.torch).
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], dtype=np.float32)
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]], dtype=np.float32)
PCA_STD = 0.1
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    if img.shape[1] == width and img.shape[0] == height:
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))


def resize_shorter(img: np.ndarray, size: int) -> np.ndarray:
    """Resizes so that the shorter side is ``size``, keeping the aspect ratio."""
    h, w = img.shape[:2]
    if min(h, w) == size:
        return img
    scale = size / min(h, w)
    return _resize(img, max(size, round(w * scale)), max(size, round(h * scale)))


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return img[top:top + size, left:left + size]


def eval_transform(img: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size / 0.875``, centre crop ``size``; small images are resized
    straight to ``size``."""
    h, w = img.shape[:2]
    if min(h, w) <= size:
        return _resize(center_crop(img, min(h, w)), size, size)
    return center_crop(resize_shorter(img, round(size / EVAL_CROP_FRACTION)), size)


def pca_lighting(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """AlexNet's colour augmentation on a uint8 RGB image."""
    alpha = rng.normal(0.0, PCA_STD, size=3).astype(np.float32)
    shift = PCA_EIGVEC @ (alpha * PCA_EIGVAL) * 255.0
    return np.clip(img.astype(np.float32) + shift, 0, 255).round().astype(np.uint8)


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator, pad: int = 0) -> np.ndarray:
    if pad:
        img = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    h, w = img.shape[:2]
    if h < size or w < size:
        img = resize_shorter(img, size)
        h, w = img.shape[:2]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return img[top:top + size, left:left + size]


def rrc_box(h: int, w: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple:
    """A random-resized-crop box ``(top, left, height, width)``; falls back to the
    centre crop of the largest allowed aspect after 10 tries (as torchvision)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def train_transform(img: np.ndarray, kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """The training augmentation ``kind`` of a uint8 HWC image, returning ``size``×``size``."""
    if kind == "none":
        return eval_transform(img, size)
    if kind == "alexnet":
        out = random_crop(resize_shorter(img, round(size / EVAL_CROP_FRACTION)), size, rng)
    elif kind == "rrc":
        top, left, ch, cw = rrc_box(img.shape[0], img.shape[1], rng)
        out = _resize(img[top:top + ch, left:left + cw], size, size)
    elif kind == "cifar":
        native = min(img.shape[:2])
        out = _resize(random_crop(center_crop(img, native), native, rng, pad=4), size, size)
    else:
        raise ValueError(f"unknown augmentation {kind!r}; choose from {AUGMENTATIONS}")
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if kind == "alexnet":
        out = pca_lighting(out, rng)
    return np.ascontiguousarray(out)


# ----------------------------------------------------------------------------- on the device


def normalize(batch: torch.Tensor, dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, 3, H, W) on the device → float, scaled to [0, 1] and standardized."""
    x = batch.to(dtype) / 255.0
    mean = torch.tensor(MEAN, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def device_boxes(kind: str, n: int, h: int, w: int, size: int, rng: np.random.Generator, train: bool) -> np.ndarray:
    """Per-sample crop boxes ``(top, left, height, width, flip)`` for :func:`device_augment`."""
    boxes = np.zeros((n, 5), dtype=np.float64)
    for i in range(n):
        if not train or kind == "none":
            side = min(h, w)
            side = side if side <= size else round(size * min(h, w) / round(size / EVAL_CROP_FRACTION))
            boxes[i] = ((h - side) // 2, (w - side) // 2, side, side, 0)
            continue
        if kind == "alexnet":
            side = min(h, w, round(size * min(h, w) / round(size / EVAL_CROP_FRACTION)))
            box = (int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side, side)
        elif kind == "rrc":
            box = rrc_box(h, w, rng)
        elif kind == "cifar":
            box = (int(rng.integers(-4, 5)), int(rng.integers(-4, 5)), h, w)
        else:
            raise ValueError(f"unknown augmentation {kind!r}; choose from {AUGMENTATIONS}")
        boxes[i] = (*box, float(rng.random() < 0.5))
    return boxes


def device_augment(batch: torch.Tensor, kind: str, size: int, rng: np.random.Generator,
                   train: bool = True) -> torch.Tensor:
    """Crops, resizes and flips a uint8 (N, 3, H, W) batch on its device in one
    ``grid_sample`` (bilinear, zeros outside, which is CIFAR's zero padding), then adds
    AlexNet's PCA lighting for ``alexnet``. Returns float (N, 3, size, size) in [0, 255]."""
    n, _, h, w = batch.shape
    boxes = device_boxes(kind, n, h, w, size, rng, train)
    top, left, bh, bw, flip = (torch.from_numpy(boxes[:, i]) for i in range(5))
    # Normalized coordinates (align_corners=False): the box centre and half-extent.
    cx = (left + bw / 2) / w * 2 - 1
    cy = (top + bh / 2) / h * 2 - 1
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = bw / w * (1 - 2 * flip)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = bh / h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(batch.device, torch.float32), [n, 3, size, size], align_corners=False)
    out = F.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if train and kind == "alexnet":
        alpha = torch.from_numpy(rng.normal(0.0, PCA_STD, size=(n, 3)).astype(np.float32))
        shift = (alpha * torch.from_numpy(PCA_EIGVAL)) @ torch.from_numpy(PCA_EIGVEC).T * 255.0
        out = (out + shift.to(out.device).view(n, 3, 1, 1)).clamp_(0, 255)
    return out
