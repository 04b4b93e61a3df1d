"""Datasets, splits and loaders for ``vhist train`` (Pillow + numpy, no torchvision).

A data spec is one of:

* a CIFAR-10 folder (``cifar-10-batches-py``: ``data_batch_1..5``, ``test_batch``) or a
  CIFAR-100 folder (``cifar-100-python``: ``train``, ``test``, ``meta``), python pickle
  format, or a folder that contains one of them;
* an image-folder tree: ``ROOT/train/<class>/*.JPEG`` with ``ROOT/val/<class>/`` or
  ``ROOT/test/<class>/`` as the test set (Imagenette: ``imagenette2[-160|-320]``), or
  ``ROOT/<class>/*`` alone (then the test set is carved from it too);
* ``synthetic`` or ``synthetic:classes=10,size=32,train=512,test=128`` for smoke runs.

The held-out validation set is always carved from the training set (seeded, per
class); the test set is only ever used once, at the end of a run.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vhist.train.transforms import eval_transform, train_transform

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
CIFAR100_FILES = ["train", "test", "meta"]
FORMATS_HELP = ("a CIFAR-10 folder (cifar-10-batches-py with data_batch_1..5 and test_batch), a CIFAR-100 "
                "folder (cifar-100-python with train, test, meta), an image-folder tree "
                "(ROOT/train/<class>/*.JPEG with ROOT/val/ or ROOT/test/, e.g. imagenette2-160), "
                "or 'synthetic[:classes=10,size=32,train=512,test=128]'")


class DatasetError(ValueError):
    """A dataset path that is missing or not in a supported layout."""


# ----------------------------------------------------------------------------- sources


class ArrayImages:
    """Images held as one uint8 (N, H, W, 3) array (CIFAR, synthetic, the uint8 cache)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels.astype(np.int64)
        self.native_size = images.shape[1]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[Optional[np.ndarray], Optional[str]]:
        return np.asarray(self.images[index]), None


class FileImages:
    """Images decoded from files with Pillow; an undecodable file yields None."""

    native_size = None

    def __init__(self, paths: list[str], labels: np.ndarray):
        self.paths, self.labels = paths, labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[Optional[np.ndarray], Optional[str]]:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB")), None
        except Exception as exc:  # noqa: BLE001  Pillow raises many types for bad files
            warnings.warn(f"skipping corrupt image {path}: {exc}", stacklevel=2)
            return None, path


@dataclass
class DataBundle:
    """Everything a run needs to know about its data."""

    kind: str                     # cifar10 | cifar100 | folder | synthetic
    root: str
    classes: list[str]
    train: object                 # ArrayImages | FileImages, with train_idx / val_idx into it
    train_idx: np.ndarray
    val_idx: np.ndarray
    test: object
    test_idx: np.ndarray
    native_size: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------- formats


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"{path}: not a CIFAR python pickle ({exc}); expected {FORMATS_HELP}") from exc


def _cifar_arrays(batches: list[dict], label_key: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    except KeyError as exc:
        raise DatasetError(f"{path}: CIFAR pickle without key {exc}; expected b'data' and {label_key!r}") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DatasetError(f"{path}: CIFAR data must be (N, 3072) uint8 with N labels, got {data.shape} "
                           f"and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _names(meta: dict, key: bytes, n: int) -> list[str]:
    names = meta.get(key)
    return [x.decode() if isinstance(x, bytes) else str(x) for x in names] if names else [str(i) for i in range(n)]


def load_cifar10(root: Path):
    missing = [f for f in CIFAR10_FILES if not (root / f).is_file()]
    if missing:
        raise DatasetError(f"{root}: not a CIFAR-10 folder, missing {missing}; expected cifar-10-batches-py "
                           f"with {CIFAR10_FILES}")
    train = _cifar_arrays([_unpickle(root / f) for f in CIFAR10_FILES[:5]], b"labels", root)
    test = _cifar_arrays([_unpickle(root / "test_batch")], b"labels", root)
    meta = _unpickle(root / "batches.meta") if (root / "batches.meta").is_file() else {}
    return train, test, _names(meta, b"label_names", 10)


def load_cifar100(root: Path):
    missing = [f for f in CIFAR100_FILES if not (root / f).is_file()]
    if missing:
        raise DatasetError(f"{root}: not a CIFAR-100 folder, missing {missing}; expected cifar-100-python "
                           f"with {CIFAR100_FILES}")
    train = _cifar_arrays([_unpickle(root / "train")], b"fine_labels", root)
    test = _cifar_arrays([_unpickle(root / "test")], b"fine_labels", root)
    return train, test, _names(_unpickle(root / "meta"), b"fine_label_names", 100)


def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _scan(root: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for name in _class_dirs(root):
        if name not in index:
            raise DatasetError(f"{root / name}: class folder not present in the training set {classes[:10]}...")
        for dirpath, _, files in sorted(os.walk(root / name)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(str(Path(dirpath) / f))
                    labels.append(index[name])
    if not paths:
        raise DatasetError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) under <class>/ folders")
    return paths, np.asarray(labels, dtype=np.int64)


def load_folder(root: Path):
    """``(train_source, test_source_or_None, classes)`` of an image-folder tree."""
    train_dir = root / "train"
    if train_dir.is_dir():
        classes = _class_dirs(train_dir)
        if not classes:
            raise DatasetError(f"{train_dir}: no class folders; expected {train_dir}/<class>/*.JPEG")
        test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
        if test_dir is None:
            raise DatasetError(f"{root}: has train/ but neither val/ nor test/; expected "
                               f"{root}/val/<class>/*.JPEG (Imagenette layout) as the test set")
        return FileImages(*_scan(train_dir, classes)), FileImages(*_scan(test_dir, classes)), classes
    classes = _class_dirs(root)
    if not classes:
        raise DatasetError(f"{root}: not a dataset; expected {FORMATS_HELP}")
    return FileImages(*_scan(root, classes)), None, classes


def make_synthetic(options: dict, seed: int = 0):
    """Learnable random images: each class has its own colour and stripe frequency."""
    classes, size = int(options.get("classes", 10)), int(options.get("size", 32))
    n_train, n_test = int(options.get("train", 512)), int(options.get("test", 128))
    rng = np.random.default_rng((seed, 12345))
    colours = rng.uniform(40, 215, size=(classes, 3))
    freqs = rng.uniform(0.5, 3.0, size=classes)

    def generate(n):
        labels = rng.integers(0, classes, size=n)
        yy = np.linspace(0, 2 * np.pi, size)[None, :, None, None]
        stripes = np.sin(freqs[labels][:, None, None, None] * yy) * 30
        noise = rng.normal(0, 20, size=(n, size, size, 3))
        img = colours[labels][:, None, None, :] + stripes + noise
        return np.clip(img, 0, 255).astype(np.uint8), labels

    return generate(n_train), generate(n_test), [f"class{i}" for i in range(classes)]


def _parse_options(text: str) -> dict:
    options = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise DatasetError(f"synthetic option {item!r} must be key=value; expected {FORMATS_HELP}")
        key, value = item.split("=", 1)
        if key not in ("classes", "size", "train", "test"):
            raise DatasetError(f"unknown synthetic option {key!r} (classes, size, train, test)")
        options[key] = int(value)
    return options


def split_indices(labels: np.ndarray, fraction: float, seed: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: ``(kept, held_out)`` index arrays, held-out ≈ ``fraction``
    of every class with at least two samples."""
    rng = np.random.default_rng((seed, salt))
    kept, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(fraction * len(idx)))
        k = min(max(k, 1 if fraction > 0 and len(idx) > 1 else 0), len(idx) - 1)
        held.append(idx[:k])
        kept.append(idx[k:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def load_data(spec: str, val_fraction: float = 0.1, seed: int = 0) -> DataBundle:
    """Resolves a data spec (see the module doc) into a :class:`DataBundle`.

    Raises:
        DatasetError: the path is missing or matches none of the supported layouts; the
            message names what was expected.
    """
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    notes = []
    if spec == "synthetic" or spec.startswith("synthetic:"):
        (tx, ty), (sx, sy), classes = make_synthetic(_parse_options(spec.partition(":")[2]), seed)
        kind, root, train, test = "synthetic", spec, ArrayImages(tx, ty), ArrayImages(sx, sy)
    else:
        kind_hint, _, path = spec.partition(":") if spec.split(":", 1)[0] in ("cifar10", "cifar100", "folder") \
            else ("", "", spec)
        root = Path(path).expanduser()
        if not root.exists():
            raise DatasetError(f"dataset path {root} does not exist; expected {FORMATS_HELP}")
        if not root.is_dir():
            raise DatasetError(f"dataset path {root} is a file, not a folder; expected {FORMATS_HELP}")
        for sub in ("cifar-10-batches-py", "cifar-100-python"):
            if not kind_hint and (root / sub).is_dir():
                root = root / sub
        if kind_hint == "cifar10" or (not kind_hint and (root / "data_batch_1").exists()):
            kind, ((tx, ty), (sx, sy), classes) = "cifar10", load_cifar10(root)
        elif kind_hint == "cifar100" or (not kind_hint and (root / "meta").is_file() and (root / "train").is_file()):
            kind, ((tx, ty), (sx, sy), classes) = "cifar100", load_cifar100(root)
        else:
            kind = "folder"
            train, test, classes = load_folder(root)
        if kind.startswith("cifar"):
            train, test = ArrayImages(tx, ty), ArrayImages(sx, sy)
        root = str(root)
    train_idx = np.arange(len(train))
    if test is None:
        train_idx, test_idx = split_indices(train.labels, 0.1, seed, salt=2)
        test = train
        notes.append("no separate test folder: 10% of the images (seeded, per class) are the test set")
    else:
        test_idx = np.arange(len(test))
    if val_fraction > 0:
        kept, held = split_indices(train.labels[train_idx], val_fraction, seed, salt=1)
        train_idx, val_idx = train_idx[kept], train_idx[held]
    else:
        val_idx = np.zeros(0, dtype=np.int64)
        notes.append("--val-fraction 0: no validation set; the best checkpoint is the last one")
    return DataBundle(kind, root, classes, train, train_idx, val_idx, test, test_idx,
                      getattr(train, "native_size", None), notes)


# ----------------------------------------------------------------------------- cache


def build_cache(source, indices: np.ndarray, size: int, cache_dir: Path, tag: str) -> ArrayImages:
    """Decodes ``source[indices]`` once into a uint8 (N, size, size, 3) array (shorter side
    resized to ``size``, centre crop) stored as ``.npy`` under ``cache_dir``; corrupt
    images are dropped (and warned about) while building."""
    key = hashlib.sha1(("\n".join(source.paths[i] for i in indices) + f"|{size}").encode()).hexdigest()[:16]
    path = cache_dir / f"{tag}-{size}px-{key}.npz"
    if path.is_file():
        with np.load(path) as f:
            return ArrayImages(f["images"], f["labels"])
    from vhist.train.transforms import center_crop, resize_shorter

    images, labels = [], []
    for i in indices:
        img, _ = source.load(int(i))
        if img is not None:
            images.append(center_crop(resize_shorter(img, size), size))
            labels.append(source.labels[i])
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, images=np.stack(images), labels=np.asarray(labels, dtype=np.int64))
    os.replace(tmp, path)
    return ArrayImages(np.stack(images), np.asarray(labels, dtype=np.int64))


# ----------------------------------------------------------------------------- loading


class SampleSet(torch.utils.data.Dataset):
    """A subset of a source with its per-sample transform. Keys are ``(index, epoch)``:
    the augmentation generator is seeded from ``(seed, epoch, index)``."""

    def __init__(self, source, indices: np.ndarray, size: int, augment: str, train: bool, seed: int,
                 raw: bool = False):
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)
        self.size, self.augment, self.train, self.seed, self.raw = size, augment, train, seed, raw

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        pos, epoch = key
        index = int(self.indices[pos])
        img, bad = self.source.load(index)
        label = int(self.source.labels[index])
        if img is None:
            return None, label, bad
        if not self.raw:
            if self.train:
                img = train_transform(img, self.augment, self.size, np.random.default_rng((self.seed, epoch, index)))
            else:
                img = eval_transform(img, self.size)
        return torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1), label, None


def collate(items):
    """Stacks the decodable samples; returns ``(images uint8 NCHW, labels, corrupt paths)``."""
    good = [(img, label) for img, label, _ in items if img is not None]
    bad = [path for img, _, path in items if img is None]
    if not good:
        return None, None, bad
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), bad


class EpochBatches(torch.utils.data.Sampler):
    """Batches of ``(position, epoch)`` keys, identical on every run with the same seed.

    Training shuffles with a generator seeded by ``(seed, epoch)``, pads the permutation
    by wrapping so it divides among ``world`` ranks, takes rank ``rank``'s stride, and
    drops a last partial batch (unless it is the only one). Evaluation keeps order,
    splits without padding and keeps every sample. ``start`` skips batches already
    done when resuming mid-epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, train: bool, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.train, self.rank, self.world = n, batch_size, seed, train, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _positions(self) -> np.ndarray:
        if not self.train:
            return np.arange(self.n)[self.rank::self.world]
        order = np.random.default_rng((self.seed, self.epoch, 777)).permutation(self.n)
        total = -(-self.n // self.world) * self.world
        order = np.concatenate([order, order[:total - self.n]]) if total > self.n else order
        return order[self.rank::self.world]

    def batches(self) -> list[np.ndarray]:
        pos = self._positions()
        out = [pos[i:i + self.batch_size] for i in range(0, len(pos), self.batch_size)]
        if self.train and len(out) > 1 and len(out[-1]) < self.batch_size:
            out.pop()
        return out

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self):
        for batch in self.batches()[self.start:]:
            yield [(int(p), self.epoch) for p in batch]


def make_loader(dataset: SampleSet, sampler: EpochBatches, workers: int, pin: bool):
    """A DataLoader with its own generator, so creating it never draws from (and never
    shifts) the global torch RNG that dropout uses."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate, pin_memory=pin,
        generator=torch.Generator().manual_seed(0), persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None)
