"""``vhist data make digits``: scikit-learn's handwritten digits as a CIFAR-10 folder.

The only real image data set that ships inside a package here: 1,797 8x8 scans of the
digits 0-9 (UCI "Optical Recognition of Handwritten Digits", grey levels 0-16), which
scikit-learn's ``load_digits`` returns without a download. Each scan is scaled to 0-255,
upsampled to 32x32 with Pillow's bilinear filter and repeated over 3 channels, then
written in CIFAR-10's python pickle layout (``data_batch_1..5``, ``test_batch``,
``batches.meta``), so every command that takes CIFAR data takes it. The train / test
split is fixed: 20% of each class (seeded, :data:`SPLIT_SEED`) is the test set, 1,438
train and 359 test images; ``vhist train`` carves its validation split from the 1,438.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np

from vhist.train.data import CIFAR10_FILES, split_indices

FOLDER = "digits-32"
SIZE = 32
TEST_FRACTION = 0.2
SPLIT_SEED = 0
DATASETS = ("digits",)


class MissingExtra(ImportError, ValueError):
    """An optional dependency is not installed: an ImportError that the CLI, which reports
    ValueErrors in one line, reports as a user's error."""


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (1797, 32, 32, 3), labels int64)`` from scikit-learn.

    Raises:
        MissingExtra: scikit-learn is not installed (the message says how to install it).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingExtra("vhist data make digits needs scikit-learn: pip install 'vhist[data]' "
                          "(or pip install scikit-learn)") from None
    from PIL import Image

    digits = load_digits()
    scans = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    up = np.stack([np.asarray(Image.fromarray(s).resize((SIZE, SIZE), Image.BILINEAR)) for s in scans])
    return np.repeat(up[..., None], 3, axis=3), digits.target.astype(np.int64)


def _write_batch(path: Path, images: np.ndarray, labels: np.ndarray, name: str) -> None:
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3 * SIZE * SIZE)
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": labels.tolist(), b"batch_label": name.encode()}, f)


def make_digits(root: str | os.PathLike) -> dict:
    """Writes ``ROOT/digits-32`` (module doc); an existing folder is left as it is.

    Returns:
        ``{"path", "status": "written" | "present", "train", "test"}``.
    """
    dest = Path(root).expanduser() / FOLDER
    if dest.exists():
        return {"path": str(dest), "status": "present"}
    images, labels = digits_arrays()
    train_idx, test_idx = split_indices(labels, TEST_FRACTION, SPLIT_SEED, salt=3)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would make the data set private
        for k, part in enumerate(np.array_split(train_idx, 5)):
            _write_batch(tmp / CIFAR10_FILES[k], images[part], labels[part], f"digits training batch {k + 1} of 5")
        _write_batch(tmp / "test_batch", images[test_idx], labels[test_idx], "digits testing batch")
        with open(tmp / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [str(d).encode() for d in range(10)], b"num_vis": 3 * SIZE * SIZE}, f)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"path": str(dest), "status": "written", "train": len(train_idx), "test": len(test_idx)}


def run_make(args) -> int:
    """``vhist data make NAME --root DIR``."""
    if args.name not in DATASETS:
        raise ValueError(f"unknown data set {args.name!r} to make; choose from {', '.join(DATASETS)}")
    result = make_digits(args.root)
    if result["status"] == "present":
        print(f"{result['path']} already exists: nothing to write (remove it to write it again)")
    else:
        print(f"digits: {result['path']} ({result['train']} train / {result['test']} test images, 32 px, "
              "CIFAR-10 pickle layout)")
    print(f"train on it with: vhist train --data {result['path']} ...")
    return 0
