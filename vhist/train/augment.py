"""Batch augmentation on the device: RandAugment / TrivialAugment, random erasing,
mixup / cutmix with label smoothing, and the soft-target cross-entropy.

Written by hand (torch ops only) because every random draw must come from a generator
the caller passes in: the training loop seeds one per step from ``(seed, epoch, step,
rank)``, so a ``--resume`` mid-epoch draws exactly what the uninterrupted run drew.
kornia's ``kornia.augmentation`` draws from the global torch generator and takes no
``generator=`` (kornia/kornia#4427), and torchvision is not installable next to every
torch build vhist supports. Scalar parameters (which op, magnitudes, boxes, mixing
weights) come from a numpy ``Generator``; per-pixel noise (random erasing) from a
``torch.Generator`` on the batch's device.

Images here are (N, 3, H, W) batches with values in [0, 255], uint8 or float (the
cached loader's ``grid_sample`` output is float); the colour ops follow Pillow's
``ImageEnhance`` / ``ImageOps`` definitions on which torchvision's and timm's
RandAugment are built.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

AUTO_AUGMENT_HELP = "none, trivial (TrivialAugmentWide) or rand-mM-nN (RandAugment, e.g. rand-m9-n2)"
BINS = 31  # magnitude bins of torchvision's RandAugment and TrivialAugmentWide
FILL = 128.0  # the constant geometric ops fill uncovered pixels with (mid-grey, as timm's img_mean)


# ----------------------------------------------------------------------------- generators


def step_generators(seed: int, epoch: int, step: int, rank: int, device: torch.device
                    ) -> tuple[np.random.Generator, torch.Generator]:
    """The numpy and torch generators of one training step, seeded from its position
    in the run only (never from global state), so a resumed run redraws them."""
    seq = np.random.SeedSequence((seed, epoch, step, rank, 16))
    torch_gen = torch.Generator(device=device)
    torch_gen.manual_seed(int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return np.random.default_rng(seq), torch_gen


# ----------------------------------------------------------------------------- colour ops


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, Pillow's ``convert("L")``: (N, 1, H, W)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ``ImageEnhance``: ``degenerate + factor · (x − degenerate)``, clipped."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 255)


def brightness(x, factor):
    return _blend(torch.zeros_like(x), x, factor)


def color(x, factor):
    return _blend(_grey(x).expand_as(x), x, factor)


def contrast(x, factor):
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(mean.expand_as(x), x, factor)


def sharpness(x, factor):
    """Blend with Pillow's SMOOTH filter (3×3, centre 5, others 1, /13), borders kept."""
    kernel = torch.ones(3, 1, 3, 3, dtype=x.dtype, device=x.device)
    kernel[:, :, 1, 1] = 5.0
    smooth = F.conv2d(x, kernel / 13.0, groups=3)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


def posterize(x, bits):
    """Keeps the ``bits`` high bits of each (rounded) 8-bit value."""
    step = (2.0 ** (8 - bits)).view(-1, 1, 1, 1)
    return torch.floor(x.round() / step) * step


def solarize(x, threshold):
    """Inverts the values at or above ``threshold``."""
    return torch.where(x >= threshold.view(-1, 1, 1, 1), 255.0 - x, x)


def autocontrast(x, _=None):
    """Per channel, stretches [min, max] to [0, 255] (Pillow's ``autocontrast``, cutoff 0)."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo
    scale = 255.0 / torch.where(flat, torch.ones_like(hi), hi - lo)
    return torch.where(flat, x, ((x - lo) * scale).clamp_(0, 255))


def equalize(x, _=None):
    """Per channel histogram equalization with Pillow's ``ImageOps.equalize`` lookup
    table: ``step = (pixels − count of the last used level) // 255`` and
    ``lut[v] = (cumulative count below v + step // 2) // step``; a channel with one
    level (step 0) is unchanged."""
    n, c, h, w = x.shape
    levels = x.round().clamp(0, 255).long().reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(
        1, levels, torch.ones_like(levels))
    last = 255 - torch.flip(hist > 0, dims=[1]).long().argmax(dim=1)
    step = (h * w - hist.gather(1, last[:, None])) // 255
    below = torch.cumsum(hist, dim=1) - hist
    lut = ((below + step // 2) // step.clamp(min=1)).clamp_(max=255)
    out = torch.where(step > 0, lut.gather(1, levels), levels)
    return out.view(n, c, h, w).to(x.dtype)


def identity(x, _=None):
    return x


# ----------------------------------------------------------------------------- geometric ops


def affine(x: torch.Tensor, matrix: torch.Tensor, fill: float = FILL) -> torch.Tensor:
    """Resamples ``x`` (nearest neighbour, as torchvision's default) through per-sample
    2×3 ``matrix`` mapping output pixel coordinates (origin at the image centre) to input
    ones; uncovered pixels get ``fill``."""
    n, _, h, w = x.shape
    scale = torch.tensor([w / 2, h / 2], dtype=torch.float64)
    theta = torch.empty(n, 2, 3, dtype=torch.float64)
    # normalized = pixel / scale: A_norm = S^-1 A S, t_norm = S^-1 t
    theta[:, :, :2] = matrix[:, :, :2] * scale[None, None, :] / scale[None, :, None]
    theta[:, :, 2] = matrix[:, :, 2] / scale[None, :]
    grid = F.affine_grid(theta.to(x.device, torch.float32), [n, 1, h, w], align_corners=False)
    ones = torch.ones(n, 1, h, w, dtype=torch.float32, device=x.device)
    out = F.grid_sample(torch.cat([x.float(), ones], 1), grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)
    inside = out[:, 3:]
    return (out[:, :3] * inside + fill * (1 - inside)).to(x.dtype)


def _matrices(n: int, a=0.0, b=0.0, c=0.0, d=0.0, tx=0.0, ty=0.0) -> torch.Tensor:
    m = torch.zeros(n, 2, 3, dtype=torch.float64)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = 1 + a, b, c, 1 + d
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def shear_x(x, s):
    return affine(x, _matrices(len(x), b=s.double().cpu()))


def shear_y(x, s):
    return affine(x, _matrices(len(x), c=s.double().cpu()))


def translate_x(x, pixels):
    return affine(x, _matrices(len(x), tx=pixels.double().cpu()))


def translate_y(x, pixels):
    return affine(x, _matrices(len(x), ty=pixels.double().cpu()))


def rotate(x, degrees):
    """Rotation about the image centre by ``degrees``."""
    r = torch.deg2rad(degrees.double().cpu())
    cos, sin = torch.cos(r), torch.sin(r)
    return affine(x, _matrices(len(x), a=cos - 1, b=-sin, c=sin, d=cos - 1))


# ----------------------------------------------------------------------------- RandAugment


@dataclass(frozen=True)
class Op:
    """One augmentation: its function, its magnitudes over the bins (or None), and
    whether a magnitude's sign is drawn at random."""

    fn: Callable
    magnitudes: Optional[Callable[[int, int], np.ndarray]]   # (bins, image size) -> values
    signed: bool = False


def _linspace(top: float) -> Callable[[int, int], np.ndarray]:
    return lambda bins, size: np.linspace(0.0, top, bins)


def _ops(wide: bool) -> dict[str, Op]:
    """The op space of torchvision's ``RandAugment`` (``wide=False``; Cubuk et al. 2020)
    or ``TrivialAugmentWide`` (``wide=True``; Müller & Hutter 2021, Table 1 "wide")."""
    enh = 0.99 if wide else 0.9
    translate = (lambda bins, size: np.linspace(0.0, 32.0, bins)) if wide else \
        (lambda bins, size: np.linspace(0.0, 150.0 / 331.0 * size, bins))
    posterize_top = 6 if wide else 4
    return {
        "identity": Op(identity, None),
        "shear_x": Op(shear_x, _linspace(0.99 if wide else 0.3), True),
        "shear_y": Op(shear_y, _linspace(0.99 if wide else 0.3), True),
        "translate_x": Op(translate_x, translate, True),
        "translate_y": Op(translate_y, translate, True),
        "rotate": Op(rotate, _linspace(135.0 if wide else 30.0), True),
        "brightness": Op(lambda x, m: brightness(x, 1 + m), _linspace(enh), True),
        "color": Op(lambda x, m: color(x, 1 + m), _linspace(enh), True),
        "contrast": Op(lambda x, m: contrast(x, 1 + m), _linspace(enh), True),
        "sharpness": Op(lambda x, m: sharpness(x, 1 + m), _linspace(enh), True),
        "posterize": Op(posterize, lambda bins, size: 8 - np.round(np.arange(bins) / ((bins - 1) / posterize_top))),
        "solarize": Op(solarize, lambda bins, size: np.linspace(255.0, 0.0, bins)),
        "autocontrast": Op(autocontrast, None),
        "equalize": Op(equalize, None),
    }


RAND_OPS, WIDE_OPS = _ops(False), _ops(True)


def parse_auto_augment(spec: str) -> tuple[str, int, int]:
    """``none`` | ``trivial`` | ``rand-mM-nN`` → (kind, magnitude, ops per image).

    Raises:
        ValueError: for another spec, or M outside 0..30.
    """
    if spec in ("none", "trivial"):
        return spec, 0, 1
    match = re.fullmatch(r"rand-m(\d+)-n(\d+)", spec)
    if not match:
        raise ValueError(f"--auto-augment must be {AUTO_AUGMENT_HELP}, got {spec!r}")
    m, n = int(match.group(1)), int(match.group(2))
    if m >= BINS or n < 1:
        raise ValueError(f"--auto-augment {spec}: the magnitude M must be 0..{BINS - 1} and N >= 1")
    return "rand", m, n


def apply_ops(x: torch.Tensor, names: list[str], magnitudes: np.ndarray, space: dict[str, Op]) -> torch.Tensor:
    """Applies op ``names[i]`` with magnitude ``magnitudes[i]`` to sample ``i``: each op
    runs once, on the samples that drew it."""
    out = x.clone()
    mags = torch.as_tensor(magnitudes, dtype=torch.float32)
    for name in sorted(set(names)):
        idx = [i for i, s in enumerate(names) if s == name]
        if name == "identity":
            continue
        sel = torch.tensor(idx, device=x.device)
        out[sel] = space[name].fn(x[sel], mags[idx].to(x.device))
    return out


def auto_augment(batch: torch.Tensor, spec: str, rng: np.random.Generator) -> torch.Tensor:
    """RandAugment (Cubuk et al. 2020: N ops drawn uniformly per image, each at
    magnitude bin M of 31, random sign) or TrivialAugmentWide (Müller & Hutter 2021:
    one op per image, its bin drawn uniformly) on a uint8 or float batch in [0, 255].

    Returns:
        The batch, same dtype (uint8 results are rounded).
    """
    kind, m, n_ops = parse_auto_augment(spec)
    if kind == "none":
        return batch
    x, size = batch.float(), min(batch.shape[-2:])
    space = WIDE_OPS if kind == "trivial" else RAND_OPS
    names = list(space)
    table = {name: op.magnitudes(BINS, size) if op.magnitudes else np.zeros(BINS) for name, op in space.items()}
    for _ in range(n_ops):
        picks = [names[k] for k in rng.integers(0, len(names), size=len(x))]
        bins = rng.integers(0, BINS, size=len(x)) if kind == "trivial" else np.full(len(x), m)
        signs = np.where(rng.random(len(x)) < 0.5, -1.0, 1.0)
        mags = np.array([table[name][b] * (sign if space[name].signed else 1.0)
                         for name, b, sign in zip(picks, bins, signs)])
        x = apply_ops(x, picks, mags, space)
    return x.round().clamp_(0, 255).to(torch.uint8) if batch.dtype == torch.uint8 else x


# ----------------------------------------------------------------------------- random erasing


def erase_boxes(n: int, h: int, w: int, prob: float, rng: np.random.Generator, area=(0.02, 1 / 3),
                log_ratio=(math.log(0.3), math.log(1 / 0.3))) -> list[Optional[tuple]]:
    """Per sample, with probability ``prob``, one box ``(top, left, height, width)`` of
    2%–1/3 of the image and aspect 0.3–3.3 (Zhong et al. 2020, Alg. 1; 10 tries, as
    timm's ``RandomErasing``), else None."""
    boxes: list[Optional[tuple]] = []
    for _ in range(n):
        box = None
        if rng.random() < prob:
            for _ in range(10):
                target = h * w * rng.uniform(*area)
                aspect = math.exp(rng.uniform(*log_ratio))
                bh, bw = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
                if 0 < bh < h and 0 < bw < w:
                    box = (int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw)
                    break
        boxes.append(box)
    return boxes


def random_erasing(x: torch.Tensor, prob: float, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020) of a normalized float batch, in place: each
    chosen box is filled with per-pixel standard-normal noise (timm's ``mode='pixel'``,
    i.e. noise in the normalized space)."""
    n, c, h, w = x.shape
    for i, box in enumerate(erase_boxes(n, h, w, prob, rng)):
        if box is not None:
            top, left, bh, bw = box
            x[i, :, top:top + bh, left:left + bw] = torch.randn(
                (c, bh, bw), generator=gen, device=x.device, dtype=torch.float32).to(x.dtype)
    return x


# ----------------------------------------------------------------------------- mixup / cutmix


@dataclass(frozen=True)
class MixSpec:
    """timm's ``Mixup`` in batch mode: with probability ``prob`` a batch is mixed with
    its reverse; cutmix is chosen with ``switch_prob`` when both alphas are set."""

    mixup: float = 0.0      # Beta(alpha, alpha) of mixup (Zhang et al. 2018); 0: off
    cutmix: float = 0.0     # Beta(alpha, alpha) of cutmix (Yun et al. 2019); 0: off
    prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


def draw_mix(spec: MixSpec, rng: np.random.Generator) -> tuple[float, bool]:
    """(lambda, use cutmix) of one batch; lambda is 1 when the batch is not mixed."""
    if not spec.enabled or rng.random() >= spec.prob:
        return 1.0, False
    use_cutmix = spec.cutmix > 0 and (spec.mixup == 0 or rng.random() < spec.switch_prob)
    alpha = spec.cutmix if use_cutmix else spec.mixup
    return float(rng.beta(alpha, alpha)), use_cutmix


def cutmix_box(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Yun et al. 2019, Eq. 2: a box of sides ``sqrt(1 − lam)`` × (H, W) centred on a
    uniform point, clipped to the image: ``(top, bottom, left, right)``."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    return (int(np.clip(cy - ch // 2, 0, h)), int(np.clip(cy + ch // 2, 0, h)),
            int(np.clip(cx - cw // 2, 0, w)), int(np.clip(cx + cw // 2, 0, w)))


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Label smoothing (Szegedy et al. 2016, §7): ``1 − s + s/K`` on the label, ``s/K`` elsewhere."""
    off = smoothing / num_classes
    out = torch.full((len(labels), num_classes), off, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def mix_batch(x: torch.Tensor, labels: torch.Tensor, num_classes: int, spec: MixSpec,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixes a batch with its reverse (sample ``i`` with ``N − 1 − i``), as timm.

    Mixup: ``lam · x + (1 − lam) · x.flip(0)``. Cutmix: the box of
    :func:`cutmix_box` is pasted from the reversed batch and lambda is corrected to the
    clipped box's area, ``1 − area / (H W)``. Targets: ``lam · y + (1 − lam) · y.flip(0)``
    with ``y`` the smoothed one-hot labels.

    Returns:
        (mixed batch, soft targets (N, K), the lambda used).
    """
    lam, use_cutmix = draw_mix(spec, rng)
    if lam < 1.0:
        if use_cutmix:
            top, bottom, left, right = cutmix_box(x.shape[-2], x.shape[-1], lam, rng)
            x = x.clone()
            x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (x.shape[-2] * x.shape[-1])
        else:
            x = x * lam + x.flip(0) * (1.0 - lam)
    y = smooth_one_hot(labels, num_classes, spec.smoothing)
    return x, y * lam + y.flip(0) * (1.0 - lam), lam


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``−Σ_k t_k log softmax(z)_k``."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


# ----------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class BatchAugment:
    """The recipe's batch augmentations, applied in timm's order: auto-augment on the
    [0, 255] images, then (after normalization) random erasing, then mixup / cutmix."""

    auto_augment: str = "none"
    random_erasing: float = 0.0
    mix: MixSpec = MixSpec()

    @property
    def active(self) -> bool:
        return self.auto_augment != "none" or self.random_erasing > 0 or self.mix.enabled
