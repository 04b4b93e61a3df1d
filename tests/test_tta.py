"""Test-time augmentation of ``vhist eval --tta``: the 10-crop and flip geometry, the
softmax averaging, and the CLI end to end against a hand-computed evaluation."""
import json

import numpy as np
import pytest
import torch

import vhist
from vhist.__main__ import main
from vhist.train import checkpoint as ckpt
from vhist.train.data import load_data
from vhist.train.evaluation import TTAModel, ten_crop_offsets, ten_crop_side, tta_views
from vhist.train.transforms import center_crop, eval_transform, normalize, resize_shorter

DATA = "synthetic:classes=3,size=8,train=30,test=10"
FAST = ["--model", "tiny_train_net", "--data", DATA, "--lr", "0.05", "--warmup-epochs", "0", "--batch-size", "6",
        "--workers", "0", "--backend", "torch", "--device", "cpu", "--epochs", "1"]


@pytest.fixture(autouse=True, scope="module")
def _tiny_models():
    import train_helpers  # noqa: F401  registers tiny_train_net

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("side, size, expected", [
    (256, 224, [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]),  # AlexNet: 224 patches of 256 x 256
    (7, 4, [(0, 0), (0, 3), (3, 0), (3, 3), (1, 1)]),            # odd margin: the centre rounds down
    (5, 5, [(0, 0)] * 5),                                        # patch = image: five identical views
])
def test_ten_crop_offsets(side, size, expected):
    assert ten_crop_offsets(side, size) == expected


def test_ten_crop_offsets_bad_input():
    with pytest.raises(ValueError, match="do not fit"):
        ten_crop_offsets(8, 9)
    with pytest.raises(ValueError, match="square"):
        tta_views(torch.zeros(1, 3, 8, 9), "10crop", 4)
    with pytest.raises(ValueError, match="unknown TTA mode"):
        tta_views(torch.zeros(1, 3, 8, 8), "5crop", 4)
    with pytest.raises(ValueError, match="flip TTA takes 8 px"):
        tta_views(torch.zeros(1, 3, 9, 9), "flip", 8)


def test_ten_crop_views_equal_numpy_slices():
    x = torch.arange(2 * 3 * 7 * 7, dtype=torch.float32).view(2, 3, 7, 7)
    a = x.numpy()
    views = tta_views(x, "10crop", 4).view(10, 2, 3, 4, 4).numpy()
    corners = [a[..., :4, :4], a[..., :4, 3:], a[..., 3:, :4], a[..., 3:, 3:], a[..., 1:5, 1:5]]
    for k, patch in enumerate(corners):
        np.testing.assert_array_equal(views[k], patch)
        np.testing.assert_array_equal(views[5 + k], patch[..., ::-1])
    assert len({v.tobytes() for v in views}) == 10  # ten distinct views of a non-symmetric image


def test_flip_views():
    x = torch.randn(3, 3, 5, 5)
    views = tta_views(x, "flip", 5)
    assert views.shape == (6, 3, 5, 5)
    torch.testing.assert_close(views[:3], x, rtol=0, atol=0)
    np.testing.assert_array_equal(views[3:].numpy(), x.numpy()[..., ::-1])


class _LeftRight(torch.nn.Module):
    """Logits that depend on where the mass of the image lies (so flips change them)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("mode, side", [("flip", 4), ("10crop", 6)])
def test_tta_model_averages_softmax(mode, side):
    torch.manual_seed(0)
    net, x = _LeftRight(), torch.randn(3, 3, side, side)
    out = TTAModel(net, mode, 4)(x)
    if mode == "flip":
        views = [x, x.flip(-1)]
    else:
        views = [x[..., t:t + 4, l:l + 4] for t, l in ten_crop_offsets(side, 4)]
        views += [v.flip(-1) for v in views]
    expected = torch.stack([net(v).softmax(1) for v in views]).mean(0)
    torch.testing.assert_close(out.exp(), expected)
    # the loss evaluate() computes from it is the NLL of the averaged probability
    labels = torch.tensor([0, 3, 1])
    torch.testing.assert_close(torch.nn.functional.cross_entropy(out, labels),
                               -expected[torch.arange(3), labels].log().mean())


def _hand_tta(checkpoint, mode):
    """top-1 and loss of a checkpoint on the test split, computed without vhist's TTA code."""
    state = ckpt.load(checkpoint)
    data = load_data(DATA, state["train_config"]["val_fraction"], state["train_config"]["seed"])
    model = vhist.create_model("tiny_train_net", num_classes=state["num_classes"])
    model.load_state_dict(state["model"])
    model.eval()
    size, probs, labels = state["image_size"], [], []
    for i in data.test_idx:
        img, _ = data.test.load(int(i))
        if mode == "flip":
            base = eval_transform(img, size)
            views = [base, base[:, ::-1]]
        else:
            side = ten_crop_side(size)
            base = center_crop(resize_shorter(img, side), side)
            m = side - size
            views = [base[t:t + size, l:l + size] for t, l in ((0, 0), (0, m), (m, 0), (m, m), (m // 2, m // 2))]
            views += [v[:, ::-1] for v in views]
        batch = torch.from_numpy(np.stack([np.ascontiguousarray(v) for v in views])).permute(0, 3, 1, 2)
        with torch.no_grad(), vhist.use_backend("torch"):
            probs.append(model(normalize(batch)).softmax(1).mean(0))
        labels.append(int(data.test.labels[i]))
    probs, labels = torch.stack(probs), torch.tensor(labels)
    top1 = 100.0 * (probs.argmax(1) == labels).double().mean().item()
    return top1, -probs[torch.arange(len(labels)), labels].log().mean().item()


def test_eval_tta_cli_matches_hand_computation_and_is_recorded(tmp_path, capsys):
    assert main(["train", *FAST, "--out-dir", str(tmp_path), "--run-name", "r"]) == 0
    run = tmp_path / "r"
    single = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    for mode in ("flip", "10crop"):
        assert main(["eval", "--checkpoint", str(run / "best.pt"), "--workers", "0", "--backend", "torch",
                     "--device", "cpu", "--batch-size", "4", "--tta", mode]) == 0
        out = capsys.readouterr()
        result = json.loads(out.out)
        assert result["tta"] == mode and result["count"] == 10
        top1, loss = _hand_tta(run / "best.pt", mode)
        assert result["top1"] == pytest.approx(top1)
        assert result["loss"] == pytest.approx(loss, rel=1e-5)
        assert f"recorded as test_tta.{mode}" in out.err
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["test_tta"]) == {"flip", "10crop"}
    assert summary["test_tta"]["10crop"]["mode"] == "10crop" and summary["test_tta"]["10crop"]["images"] == 10
    assert summary["test_top1"] == single["test_top1"]  # the single-crop numbers stay as they were
    # last.pt, or another split, is printed but not recorded
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--workers", "0", "--backend", "torch",
                 "--device", "cpu", "--tta", "flip", "--split", "val"]) == 0
    assert "recorded" not in capsys.readouterr().err


def test_eval_help_shows_tta(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--tta {flip,10crop}" in capsys.readouterr().out
