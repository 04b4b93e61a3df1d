"""`vhist train` / `vhist eval` end to end on tiny generated data (CPU, torch backend)."""
import json
import os

import numpy as np
import pytest
import torch

from vhist.__main__ import main
from vhist.train import checkpoint as ckpt
from vhist.train.data import DatasetError, EpochBatches, load_data
from vhist.train.recipes import RECIPES, get_recipe
from vhist.train.transforms import device_augment, eval_transform, train_transform

import train_helpers
from train_helpers import one_thread_fresh_hooks, reset_hooks, write_cifar10, write_image_folder  # noqa: F401

ARTIFACTS = ("config.json", "metrics.jsonl", "metrics.csv", "curves.png", "best.pt", "last.pt", "summary.json")
FAST = ["--model", "tiny_train_net", "--recipe", "modern", "--lr", "0.05", "--warmup-epochs", "0",
        "--batch-size", "8", "--workers", "0", "--backend", "torch"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


def _train(tmp_path, data, name, *extra):
    rc = main(["train", *FAST, "--data", str(data), "--out-dir", str(tmp_path), "--run-name", name, *extra])
    return rc, tmp_path / name


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _check_run(run, epochs):
    for artifact in ARTIFACTS:
        assert (run / artifact).is_file(), artifact
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], rows
    assert (run / "metrics.csv").read_text().count("\n") == epochs + 1
    from PIL import Image

    with Image.open(run / "curves.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"]["optimizer"] == "sgd" and config["recipe"]["epochs"] == epochs
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_done"] == epochs
    assert 0 <= summary["test_top1"] <= summary["test_top5"] <= 100
    assert summary["wall_time_s"] > 0 and summary["train_img_per_s"] > 0
    return summary


def test_train_cifar_end_to_end(tmp_path, cifar, capsys):
    rc, run = _train(tmp_path, cifar, "cifar", "--epochs", "2")
    assert rc == 0
    summary = _check_run(run, 2)
    out = capsys.readouterr().out
    assert '"label_smoothing": 0.1' in out and "recipe modern" in out  # recipe printed in full
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["kind"] == "cifar10" and config["recipe"]["augment"] == "cifar"
    assert config["recipe"]["image_size"] == 32
    assert config["data"]["train"] + config["data"]["val"] == 60 and config["data"]["test"] == 16

    # vhist eval on the best checkpoint reproduces the summary's test accuracy
    assert main(["eval", "--checkpoint", str(run / "best.pt"), "--workers", "0", "--backend", "torch"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(summary["test_top1"])
    assert result["top5"] == pytest.approx(summary["test_top5"])
    assert result["count"] == 16


def test_train_image_folder_with_corrupt_image(tmp_path):
    data = write_image_folder(tmp_path / "data", corrupt=1)
    with pytest.warns(UserWarning, match="skipping corrupt image"):
        rc, run = _train(tmp_path, data, "folder", "--epochs", "2", "--image-size", "16", "--augment", "alexnet")
    assert rc == 0
    summary = _check_run(run, 2)
    assert summary["corrupt_images"] == 1 and "broken_0.JPEG" in summary["corrupt_paths"][0]
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["kind"] == "folder" and len(config["data"]["classes"]) == 3
    assert config["data"]["test"] == 9  # val/ is the test set


def test_cached_loader_and_device_augmentation(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", per_class=4)
    rc, run = _train(tmp_path, data, "cached", "--epochs", "1", "--image-size", "16", "--cache",
                     "--cache-dir", str(tmp_path / "cache"), "--augment", "rrc")
    assert rc == 0
    assert any(p.suffix == ".npz" for p in (tmp_path / "cache").iterdir())
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    rc, _ = _train(tmp_path, data, "bench", "--cache", "--cache-dir", str(tmp_path / "cache"), "--bench-loader", "2",
                   "--image-size", "16", "--batch-size", "2")
    assert rc == 0
    assert "loader alone:" in capsys.readouterr().out


def _final_state(run):
    return ckpt.load(run / "last.pt")


def _assert_same_state(a, b):
    assert a["epoch"] == b["epoch"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
    assert a["schedule"] == b["schedule"]
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert [r["val_top1"] for r in a["history"]] == [r["val_top1"] for r in b["history"]]


def test_resume_is_bitwise(tmp_path, cifar):
    args = ("--epochs", "2", "--seed", "3")
    assert _train(tmp_path, cifar, "straight", *args)[0] == 0
    straight = _final_state(tmp_path / "straight")

    # stop after one epoch, then resume
    rc, run = _train(tmp_path, cifar, "split", *args, "--stop-after-epochs", "1")
    assert rc == 0 and json.loads((run / "summary.json").read_text())["status"] == "stopped"
    assert main(["train", "--resume", str(run / "last.pt"), "--workers", "0", "--backend", "torch"]) == 0
    _assert_same_state(straight, _final_state(run))

    # Ctrl-C in the middle of epoch 1 (the 4th training forward), then resume
    run = _interrupt_and_resume(tmp_path, cifar, args, "interrupted", "interrupt_at", 4, straight, (0, 3))
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"

    # a real SIGINT during the 9th forward (epoch 2, step 3): the step finishes, then it saves
    _interrupt_and_resume(tmp_path, cifar, args, "sigint", "sigint_at", 9, straight, (1, 3))


def _interrupt_and_resume(tmp_path, cifar, args, name, hook, at, straight, where):
    """Interrupts a run at the ``at``-th training forward, checks the checkpoint is at
    (epoch, step) ``where``, resumes it and checks it ends bit-for-bit as ``straight``."""
    reset_hooks()
    train_helpers.HOOKS[hook] = at
    rc, run = _train(tmp_path, cifar, name, *args)
    assert rc == 130
    mid = _final_state(run)
    assert (mid["epoch"], mid["step"]) == where
    reset_hooks()
    assert main(["train", "--resume", str(run / "last.pt"), "--workers", "0", "--backend", "torch"]) == 0
    _assert_same_state(straight, _final_state(run))
    return run


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, cifar, capsys):
    steps_per_epoch = 52 // 8  # 60 train images minus 8 held out, batch 8, last partial batch dropped
    train_helpers.HOOKS["nan_at"] = steps_per_epoch + 2
    rc, run = _train(tmp_path, cifar, "nan", "--epochs", "3", "--log-every", "1")
    assert rc == 3
    assert "non-finite loss at epoch 2, step 2" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["test_top1"] is None
    last = ckpt.load(run / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert len(_metrics(run)) == 1


def test_atomic_checkpoint_survives_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    good = {"format": ckpt.FORMAT, "weights": torch.arange(10.0)}
    ckpt.save_atomic(good, path)
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"format": ckpt.FORMAT, "weights": torch.zeros(10)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(ckpt.load(path)["weights"], torch.arange(10.0))
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temporary file left behind


def test_missing_or_malformed_dataset(tmp_path, capsys):
    assert main(["train", *FAST, "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "cifar-10-batches-py" in err and "imagenette2" in err

    bad_cifar = tmp_path / "cifar-10-batches-py"
    bad_cifar.mkdir()
    (bad_cifar / "data_batch_1").write_bytes(b"junk")
    assert main(["train", *FAST, "--data", str(bad_cifar)]) == 2
    assert "missing" in capsys.readouterr().err and "test_batch" in err + "test_batch"
    with pytest.raises(DatasetError, match="test_batch"):
        load_data(str(bad_cifar))
    for name in ("data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (bad_cifar / name).write_bytes(b"junk")
    with pytest.raises(DatasetError, match="not a CIFAR python pickle"):
        load_data(str(bad_cifar))

    only_train = tmp_path / "folder"
    (only_train / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="neither val/ nor test/"):
        load_data(str(only_train))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="expected a CIFAR-10 folder"):
        load_data(str(empty))
    with pytest.raises(FileNotFoundError):
        ckpt.load(tmp_path / "missing.pt")


def test_recipes_in_help_and_validated(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name in RECIPES:
        assert name in out
    alexnet = get_recipe("seed-alexnet")
    assert (alexnet.optimizer, alexnet.lr, alexnet.weight_decay, alexnet.batch_size, alexnet.image_size,
            alexnet.epochs, alexnet.step_epochs, alexnet.gamma) == ("adamw", 1e-4, 0.1, 64, 227, 90, 30, 0.1)
    vgg = get_recipe("seed-vgg")
    assert (vgg.batch_size, vgg.image_size) == (128, 224)
    assert get_recipe("paper-inception-v3").optimizer == "rmsprop"
    assert get_recipe("paper-inception-v3").label_smoothing == 0.1
    assert get_recipe("paper-vgg").weight_decay == 5e-4 and get_recipe("paper-vgg").momentum == 0.9
    assert get_recipe("modern", lr=0.3).lr == 0.3
    with pytest.raises(ValueError, match="augment"):
        get_recipe("modern", augment="mixup")
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("nope")


def test_schedules():
    from vhist.train.recipes import LRSchedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = LRSchedule(opt, get_recipe("seed-alexnet", lr=1.0), steps_per_epoch=10)
    assert sched.factor(299) == 1.0 and sched.factor(300) == pytest.approx(0.1)
    assert sched.factor(600) == pytest.approx(0.01)
    cos = LRSchedule(opt, get_recipe("modern", lr=1.0, epochs=10, warmup_epochs=1), steps_per_epoch=10)
    assert cos.factor(0) == pytest.approx(0.1) and cos.factor(9) == pytest.approx(1.0)
    assert cos.factor(10) == pytest.approx(1.0) and cos.factor(55) == pytest.approx(0.5)
    assert cos.factor(100) == pytest.approx(0.0, abs=1e-12)


def test_augmentations():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(24, 30, 3), dtype=np.uint8)
    for kind in ("alexnet", "rrc", "cifar", "none"):
        a = train_transform(img, kind, 16, np.random.default_rng(5))
        b = train_transform(img, kind, 16, np.random.default_rng(5))
        assert a.shape == (16, 16, 3) and a.dtype == np.uint8 and np.array_equal(a, b), kind
    # pad-and-crop: a crop of the zero-padded image, or its mirror image
    small = rng.integers(1, 256, size=(8, 8, 3), dtype=np.uint8)
    out = train_transform(small, "cifar", 8, np.random.default_rng(1))
    padded = np.pad(small, ((4, 4), (4, 4), (0, 0)))
    windows = [padded[t:t + 8, l:l + 8] for t in range(9) for l in range(9)]
    assert any(np.array_equal(out, w) or np.array_equal(out, w[:, ::-1]) for w in windows)
    assert eval_transform(img, 16).shape == (16, 16, 3)
    # device augmentation: an eval box on an image of the output size is the identity
    batch = torch.from_numpy(rng.integers(0, 256, size=(2, 3, 8, 8), dtype=np.uint8))
    same = device_augment(batch, "cifar", 8, np.random.default_rng(0), train=False)
    assert torch.allclose(same, batch.float(), atol=1e-3)
    shifted = device_augment(batch, "cifar", 8, np.random.default_rng(0), train=True)
    assert shifted.shape == (2, 3, 8, 8)


def test_epoch_batches_split_between_ranks():
    ranks = [EpochBatches(12, 3, seed=1, train=True, rank=r, world=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    seen = [p for s in ranks for b in s.batches() for p in b]
    assert sorted(seen) == list(range(12))
    ranks[0].set_epoch(4)
    assert [list(b) for b in ranks[0].batches()] != [list(b) for b in ranks[1].batches()]
    ranks[0].set_epoch(3)
    again = EpochBatches(12, 3, seed=1, train=True, rank=0, world=2)
    again.set_epoch(3, start=1)
    assert [k for b in again for k in b] == [(int(p), 3) for b in ranks[0].batches()[1:] for p in b]


def test_sync_bn_runs_conv_bn_act_pairs_unfused(tmp_path, cifar):
    args = [a if a != "tiny_train_net" else "tiny_pair_net" for a in FAST]
    rc = main(["train", *args, "--data", str(cifar), "--out-dir", str(tmp_path), "--sync-bn", "--epochs", "1"])
    assert rc == 0


def test_sync_bn_refuses_bn_bypassed_by_a_fused_op(tmp_path, cifar, capsys):
    args = [a if a != "tiny_train_net" else "tiny_direct_fused_net" for a in FAST]
    rc = main(["train", *args, "--data", str(cifar), "--out-dir", str(tmp_path), "--sync-bn", "--epochs", "1"])
    assert rc == 2
    assert "did not run their own forward" in capsys.readouterr().err
