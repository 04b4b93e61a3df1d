"""`vhist data make digits`: scikit-learn's digits in CIFAR-10's pickle layout."""
import hashlib
import sys

import numpy as np

from vhist.__main__ import main
from vhist.train.data import load_data
from vhist.train.digits import make_digits


def _digest(folder):
    return hashlib.sha256(b"".join((folder / f).read_bytes() for f in sorted(p.name for p in folder.iterdir()))
                          ).hexdigest()


def test_make_digits_writes_a_cifar10_folder(tmp_path, capsys):
    assert main(["data", "make", "digits", "--root", str(tmp_path / "a")]) == 0
    folder = tmp_path / "a" / "digits-32"
    assert str(folder) in capsys.readouterr().out
    data = load_data(str(folder), val_fraction=0.1, seed=0)
    assert data.kind == "cifar10" and data.classes == [str(d) for d in range(10)] and data.native_size == 32
    n_train, n_test = len(data.train_idx) + len(data.val_idx), len(data.test_idx)
    assert (n_train, n_test) == (1438, 359) and n_train + n_test == 1797
    images, labels = data.train.images, data.test.labels
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3) and images.max() == 255
    assert np.array_equal(images[..., 0], images[..., 2])  # grey scans on 3 channels
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # 20% of each class's ~180 scans
    # the split is fixed: a second folder is byte for byte the same, and an existing one is kept
    make_digits(tmp_path / "b")
    assert _digest(folder) == _digest(tmp_path / "b" / "digits-32")
    assert make_digits(tmp_path / "a")["status"] == "present"


def test_make_digits_without_scikit_learn_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["data", "make", "digits", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs scikit-learn" in err and "vhist[data]" in err
    assert not list(tmp_path.iterdir())
    assert main(["data", "make", "mnist", "--root", str(tmp_path)]) == 2
    assert "unknown data set 'mnist'" in capsys.readouterr().err
