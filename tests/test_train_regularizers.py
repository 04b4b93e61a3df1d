"""Issue 16, training side: weight EMA, batch augmentation on the device (RandAugment,
TrivialAugmentWide, random erasing, mixup / cutmix), stochastic depth, the new recipes,
and bit-exact resume with each of them on (CPU, torch backend, tiny data)."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch import nn

import vhist
from vhist.__main__ import main
from vhist.models import DropPath, drop_path_rates
from vhist.models.resnet import BasicBlock, ResNet
from vhist.train import augment as A
from vhist.train import checkpoint as ckpt
from vhist.train.ema import ModelEma
from vhist.train.engine import select_weights
from vhist.train.recipes import RECIPES, effective_lr, get_recipe

FAST = ["--recipe", "modern", "--lr", "0.05", "--warmup-epochs", "0", "--batch-size", "8", "--workers", "0",
        "--backend", "torch"]
ALL_ON = ["--ema", "0.9", "--mixup", "0.8", "--cutmix", "1.0", "--mix-switch-prob", "0.5",
          "--auto-augment", "rand-m9-n2", "--random-erasing", "0.5", "--drop-path", "0.2"]


class TinyResNet(ResNet):
    """ResNet-18 layout at 1/16 width (one block per stage) that honours the training
    tests' misbehaviour hooks (tests/train_helpers.py) on its training forwards."""

    def __init__(self, num_classes=10, image_size=None, drop_path_rate=0.0):
        super().__init__(BasicBlock, [1, 1, 1, 1], num_classes, image_size=32, channel_divisor=16,
                         drop_path_rate=drop_path_rate)

    def forward(self, x):
        import train_helpers

        hooks = train_helpers.HOOKS
        if self.training:
            hooks["calls"] += 1
            if hooks["interrupt_at"] is not None and hooks["calls"] == hooks["interrupt_at"]:
                raise KeyboardInterrupt
        return super().forward(x)


@pytest.fixture(autouse=True, scope="module")
def _tiny_models():
    """Registers the tiny models when these tests run (tests/test_models.py lists exactly
    the zoo at collection); one intra-op thread, as the other training tests."""
    import train_helpers
    from vhist.models import list_models, register_model

    if "tiny_resnet_dp" not in list_models():
        def tiny_resnet_dp(num_classes=10, image_size=None, drop_path_rate=0.0):
            return TinyResNet(num_classes, image_size, drop_path_rate)

        register_model(tiny_resnet_dp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_helpers.reset_hooks()
    yield
    train_helpers.reset_hooks()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    import train_helpers

    return train_helpers.write_cifar10(tmp_path_factory.mktemp("cifar"))


# ----------------------------------------------------------------------------- EMA


def test_ema_matches_hand_computed_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.2)
    expected = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    decays = []
    for t in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()
        model(torch.randn(6, 3))  # moves the BN running statistics
        d = min(0.2, (1 + t) / (10 + t))
        decays.append(ema.decay_at(t))
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach().double()
        ema.update(model)
    # TensorFlow's num_updates warm-up: (1+t)/(10+t) until it reaches the decay
    assert decays == pytest.approx([1 / 10, 2 / 11, 0.2, 0.2, 0.2])
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p.double(), expected[n], rtol=1e-6, atol=1e-6)
        assert not p.requires_grad
    for (n, b), (_, ref) in zip(ema.module.named_buffers(), model.named_buffers()):
        assert torch.equal(b, ref), n  # copied, not averaged
    assert int(ema.module[1].num_batches_tracked) == 5 and ema.updates == 5

    again = ModelEma(model, decay=0.5)
    again.load_state_dict(ema.state_dict())
    assert again.decay == 0.2 and again.updates == 5
    assert all(torch.equal(a, b) for a, b in zip(again.module.state_dict().values(),
                                                 ema.module.state_dict().values()))
    with pytest.raises(ValueError, match="--ema"):
        ModelEma(model, 1.0)


def test_best_epoch_selection_takes_the_better_weights():
    assert select_weights({"top1": 60.0}, {"top1": 61.0}, True) == ("ema", 61.0)
    assert select_weights({"top1": 60.0}, {"top1": 60.0}, True) == ("raw", 60.0)
    assert select_weights({"top1": 62.0}, {"top1": 40.0}, True) == ("raw", 62.0)
    assert select_weights({"top1": 62.0}, None, False) == ("raw", 62.0)
    assert select_weights({"top1": None}, None, True) == ("ema", None)  # no validation set


# ----------------------------------------------------------------------------- mixup / cutmix


def _distinct_batch(n=6, h=10, w=12):
    """Sample i is the constant image i + 1: a pixel tells which sample it came from."""
    return torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).clone()


def test_mixup_mixes_images_and_smoothed_labels():
    x, labels = _distinct_batch(), torch.tensor([0, 1, 2, 3, 0, 1])
    spec = A.MixSpec(mixup=0.8, smoothing=0.1)
    lam, use_cutmix = A.draw_mix(spec, np.random.default_rng(7))
    assert not use_cutmix and 0 < lam < 1
    mixed, targets, used = A.mix_batch(x, labels, 4, spec, np.random.default_rng(7))
    assert used == lam
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    one_hot = torch.full((6, 4), 0.1 / 4).scatter_(1, labels[:, None], 0.9 + 0.1 / 4)
    torch.testing.assert_close(targets, lam * one_hot + (1 - lam) * one_hot.flip(0))
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    # never mixed with prob 0: the smoothed labels alone
    same, targets, used = A.mix_batch(x, labels, 4, A.MixSpec(mixup=0.8, prob=0.0, smoothing=0.1),
                                      np.random.default_rng(7))
    assert used == 1.0 and torch.equal(same, x) and torch.allclose(targets, one_hot)


def test_cutmix_box_area_corrects_lambda():
    x, labels = _distinct_batch(), torch.tensor([0, 1, 2, 3, 0, 1])
    h, w = x.shape[-2:]
    clipped = 0
    for seed in range(40):
        spec = A.MixSpec(cutmix=1.0)
        raw_lam, use_cutmix = A.draw_mix(spec, np.random.default_rng(seed))
        assert use_cutmix
        mixed, targets, lam = A.mix_batch(x, labels, 4, spec, np.random.default_rng(seed))
        pasted = mixed != x  # the box, in every channel of every sample
        area = int(pasted[0, 0].sum())
        assert lam == pytest.approx(1 - area / (h * w))
        for i in range(6):
            assert torch.equal(pasted[i], pasted[0])
            assert torch.all(mixed[i][pasted[i]] == 6 - i)  # from the reversed batch
        if area:
            rows, cols = pasted[0, 0].any(1).nonzero(), pasted[0, 0].any(0).nonzero()
            assert area == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a rectangle
        clipped += lam > raw_lam + 1e-9  # the box left the image: less pasted than 1 - lam asked
        one_hot = torch.zeros(6, 4).scatter_(1, labels[:, None], 1.0)
        torch.testing.assert_close(targets, lam * one_hot + (1 - lam) * one_hot.flip(0))
    assert clipped > 0


def test_mix_switch_prob_chooses_cutmix_or_mixup():
    rng = np.random.default_rng(0)
    assert all(A.draw_mix(A.MixSpec(mixup=0.8, cutmix=1.0, switch_prob=1.0), rng)[1] for _ in range(20))
    assert not any(A.draw_mix(A.MixSpec(mixup=0.8, cutmix=1.0, switch_prob=0.0), rng)[1] for _ in range(20))
    picks = [A.draw_mix(A.MixSpec(mixup=0.8, cutmix=1.0, switch_prob=0.5), rng)[1] for _ in range(400)]
    assert 150 < sum(picks) < 250
    logits, targets = torch.randn(5, 4), torch.softmax(torch.randn(5, 4), 1)
    expected = -(targets * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(A.soft_target_cross_entropy(logits, targets), expected)
    hard = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3, 0]), 4).float()
    torch.testing.assert_close(A.soft_target_cross_entropy(logits, hard),
                               torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 0])))


# ----------------------------------------------------------------------------- RandAugment ops


def _uint8_images(n=3, h=14, w=17, seed=0):
    return np.random.default_rng(seed).integers(20, 220, size=(n, h, w, 3), dtype=np.uint8)


# (name, our op with its argument, the Pillow reference)
PILLOW_CASES = [
    ("equalize", lambda x: A.equalize(x), ImageOps.equalize),
    ("autocontrast", lambda x: A.autocontrast(x), ImageOps.autocontrast),
    ("posterize", lambda x: A.posterize(x, torch.full((len(x),), 3.0)), lambda im: ImageOps.posterize(im, 3)),
    ("solarize", lambda x: A.solarize(x, torch.full((len(x),), 100.0)), lambda im: ImageOps.solarize(im, 100)),
    ("brightness", lambda x: A.brightness(x, torch.full((len(x),), 1.6)),
     lambda im: ImageEnhance.Brightness(im).enhance(1.6)),
    ("color", lambda x: A.color(x, torch.full((len(x),), 0.3)), lambda im: ImageEnhance.Color(im).enhance(0.3)),
    ("contrast", lambda x: A.contrast(x, torch.full((len(x),), 1.7)),
     lambda im: ImageEnhance.Contrast(im).enhance(1.7)),
    ("sharpness", lambda x: A.sharpness(x, torch.full((len(x),), 1.9)),
     lambda im: ImageEnhance.Sharpness(im).enhance(1.9)),
]


@pytest.mark.parametrize("name,ours,pillow", PILLOW_CASES, ids=[c[0] for c in PILLOW_CASES])
def test_colour_ops_match_pillow(name, ours, pillow):
    imgs = _uint8_images()
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    ref = torch.stack([torch.from_numpy(np.array(pillow(Image.fromarray(im)))).permute(2, 0, 1).float()
                       for im in imgs])
    diff = (ours(x).round() - ref).abs()
    # Pillow rounds its 8-bit intermediate results: at most one level apart
    exact = name in ("equalize", "posterize", "solarize")
    assert diff.max() <= (0 if exact else 1), f"{name}: max diff {diff.max()} at {diff.argmax()}"


def test_geometric_ops():
    x = torch.from_numpy(_uint8_images(2, 12, 12)).permute(0, 3, 1, 2).float()
    shifted = A.translate_x(x, torch.tensor([3.0, 3.0]))
    assert torch.equal(shifted[..., :-3], x[..., 3:])  # output column j reads input column j + 3
    assert torch.all(shifted[..., -3:] == A.FILL)
    turned = A.rotate(x, torch.tensor([90.0, 90.0]))
    assert torch.equal(turned, torch.rot90(x, 1, (2, 3))) or torch.equal(turned, torch.rot90(x, -1, (2, 3)))
    for op in (A.shear_x, A.shear_y, A.translate_y, A.rotate):
        assert torch.equal(op(x, torch.zeros(2)), x)
    sheared = A.shear_x(x, torch.tensor([0.3, -0.3]))
    assert torch.equal(sheared[:, :, 6], x[:, :, 6])  # the centre row does not move


@pytest.mark.parametrize("spec", ["rand-m9-n2", "trivial", "rand-m30-n3"])
def test_auto_augment_ranges_and_determinism(spec):
    uint8 = torch.from_numpy(_uint8_images(8, 16, 16)).permute(0, 3, 1, 2).contiguous()
    for batch in (uint8, uint8.float() + 0.25):
        a = A.auto_augment(batch, spec, np.random.default_rng(3))
        b = A.auto_augment(batch, spec, np.random.default_rng(3))
        c = A.auto_augment(batch, spec, np.random.default_rng(4))
        assert a.dtype == batch.dtype and a.shape == batch.shape
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert a.float().min() >= 0 and a.float().max() <= 255
        assert not torch.equal(a, batch)


@pytest.mark.parametrize("space", ["rand", "wide"])
def test_every_op_at_its_extremes_stays_in_range(space):
    ops = A.RAND_OPS if space == "rand" else A.WIDE_OPS
    x = torch.from_numpy(_uint8_images(2, 16, 16)).permute(0, 3, 1, 2).float()
    for name, op in ops.items():
        values = op.magnitudes(A.BINS, 16) if op.magnitudes else np.zeros(1)
        for m in (values[0], values[-1], -values[-1] if op.signed else values[-1]):
            out = op.fn(x, torch.full((2,), float(m)))
            assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255, (name, m)


def test_auto_augment_specs():
    assert A.parse_auto_augment("rand-m9-n2") == ("rand", 9, 2)
    assert A.parse_auto_augment("trivial")[0] == "trivial"
    for bad in ("rand-m31-n2", "rand-m9-n0", "autoaugment", "rand-m9"):
        with pytest.raises(ValueError, match="auto-augment"):
            A.parse_auto_augment(bad)
    with pytest.raises(ValueError, match="auto-augment"):
        get_recipe("modern", auto_augment="rand9")


# ----------------------------------------------------------------------------- random erasing


def test_random_erasing_boxes_and_noise():
    n, h, w = 300, 20, 24
    x = torch.zeros(n, 3, h, w)
    out = A.random_erasing(x.clone(), 0.5, np.random.default_rng(0), torch.Generator().manual_seed(0))
    again = A.random_erasing(x.clone(), 0.5, np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    erased = out.ne(0).any(dim=1)  # (n, h, w): where noise went
    hit = erased.flatten(1).any(1)
    assert 110 < int(hit.sum()) < 190  # Binomial(300, 0.5), more than 4 sigma
    for i in hit.nonzero().flatten().tolist():
        rows, cols = erased[i].any(1).nonzero(), erased[i].any(0).nonzero()
        bh, bw = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(erased[i].sum()) == bh * bw  # one rectangle
        assert 0.02 * h * w * 0.5 <= bh * bw <= h * w / 3 * 1.5  # 2%-1/3 of the area, up to rounding
        assert 0.3 / 2 <= bh / bw <= 2 / 0.3
    noise = out[hit][out[hit] != 0]
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1  # standard normal


# ----------------------------------------------------------------------------- drop path


def test_drop_path_scales_kept_samples_and_is_identity_in_eval():
    keep = 0.75
    layer = DropPath(1 - keep).train()
    x = torch.randn(20000, 3, 2)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    mask = torch.empty(20000, 1, 1).bernoulli_(keep)
    assert torch.equal(out, x * (mask / keep))  # the exact mask: kept samples scaled by 1/keep
    ratio = out[:, 0, 0] / x[:, 0, 0]
    kept = torch.isclose(ratio, torch.tensor(1 / keep))
    assert torch.all(kept | (ratio == 0)) and kept.any() and not kept.all()
    # E[mask / keep] = 1: the sample mean of the factors within 4 standard errors
    factors = mask.flatten() / keep
    assert abs(float(factors.mean()) - 1) < 4 * math.sqrt((1 - keep) / keep / len(factors))
    layer.eval()
    assert layer(x) is x
    assert DropPath(0.0).train()(x) is x
    assert drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        DropPath(1.0)


# (model, kwargs of a tiny instance, where the per-block drop paths are)
DROP_PATH_MODELS = [
    ("resnet18", dict(image_size=32, channel_divisor=16),
     lambda m: [b.drop_path for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for b in layer]),
    ("inception_resnet_v1", dict(image_size=32, channel_divisor=16, num_blocks=(1, 1, 1)),
     lambda m: [b.drop_path for b in [*m.repeat, *m.repeat_1, *m.repeat_2, m.block8]]),
    ("vit_tiny_patch16", dict(image_size=32, depth=3), lambda m: [b.drop_path for b in m.encoder.layers]),
]


@pytest.mark.parametrize("name,kwargs,blocks", DROP_PATH_MODELS, ids=[c[0] for c in DROP_PATH_MODELS])
def test_models_drop_path(name, kwargs, blocks):
    torch.manual_seed(0)
    plain = vhist.create_model(name, num_classes=5, **kwargs)
    dropped = vhist.create_model(name, num_classes=5, drop_path_rate=0.4, **kwargs)
    assert list(plain.state_dict()) == list(dropped.state_dict())  # no new keys
    dropped.load_state_dict(plain.state_dict())
    rates = [d.drop_prob for d in blocks(dropped)]
    assert rates == pytest.approx(drop_path_rates(0.4, len(rates))) and rates[-1] == pytest.approx(0.4)
    x = torch.randn(4, 3, 32, 32)
    plain.eval(), dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), dropped(x))  # identity in eval
    plain.train(), dropped.train()
    with torch.no_grad():
        torch.manual_seed(1)
        a = dropped(x)
        torch.manual_seed(1)
        b = dropped(x)
        assert torch.equal(a, b) and not torch.allclose(a, plain(x))
    dropped(x).sum().backward()


# ----------------------------------------------------------------------------- recipes and CLI


def test_recipes_and_flags(capsys):
    deit = get_recipe("deit")
    assert (deit.optimizer, deit.lr, deit.lr_base_batch, deit.weight_decay, deit.schedule, deit.warmup_epochs,
            deit.auto_augment, deit.mixup, deit.cutmix, deit.label_smoothing, deit.random_erasing,
            deit.drop_path) == ("adamw", 5e-4, 512, 0.05, "cosine", 5, "rand-m9-n2", 0.8, 1.0, 0.1, 0.25, 0.1)
    assert deit.ema > 0 and deit.source
    assert effective_lr(deit) == pytest.approx(5e-4 * 128 / 512)
    assert effective_lr(deit, world=8) == pytest.approx(1e-3)
    assert get_recipe("paper-inception-v3").ema == 0.9999 and get_recipe("paper-inception-v4").ema == 0.9999
    for name in ("seed-alexnet", "seed-vgg", "paper-alexnet", "paper-vgg", "paper-resnet", "modern"):
        r = RECIPES[name]
        assert (r.ema, r.mixup, r.cutmix, r.auto_augment, r.random_erasing, r.drop_path) == (0, 0, 0, "none", 0, 0)
    for name in ("imagenette-alexnet", "imagenette-vgg"):
        r = RECIPES[name]
        assert r.ema and r.mixup and r.cutmix and r.auto_augment == "trivial" and r.label_smoothing == 0.1
        assert "Bag of Tricks" in r.source and "TrivialAugment" in r.source
    for field, value in (("ema", 1.0), ("mix_prob", 1.5), ("random_erasing", -0.1), ("drop_path", 1.0),
                         ("mixup", -1.0)):
        with pytest.raises(ValueError, match=field.replace("_", "-")):
            get_recipe("modern", **{field: value})

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--ema", "--mixup", "--cutmix", "--mix-prob", "--mix-switch-prob", "--auto-augment",
                 "--random-erasing", "--drop-path", "--lr-base-batch", "deit", "imagenette-alexnet",
                 "imagenette-vgg", "rand-m9-n2", "trivial"):
        assert flag in out, flag


def test_drop_path_on_a_model_without_it_is_refused(tmp_path, cifar, capsys):
    import train_helpers  # noqa: F401  (tiny_train_net)

    rc = main(["train", "--model", "tiny_train_net", *FAST, "--data", str(cifar), "--out-dir", str(tmp_path),
               "--drop-path", "0.1", "--epochs", "1"])
    assert rc == 2
    assert "--drop-path: model tiny_train_net has no stochastic depth" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- end to end


def _train(tmp_path, data, name, *extra):
    rc = main(["train", "--model", "tiny_resnet_dp", *FAST, "--data", str(data), "--out-dir", str(tmp_path),
               "--run-name", name, *extra])
    return rc, tmp_path / name


def _resume(run):
    return main(["train", "--resume", str(run / "last.pt"), "--workers", "0", "--backend", "torch"])


def _assert_same(a, b):
    from test_train import _assert_same_state

    _assert_same_state(a, b)
    for k, v in a["ema"]["module"].items():
        assert torch.equal(v, b["ema"]["module"][k]), k
    assert a["ema"]["updates"] == b["ema"]["updates"]
    assert [r["ema_val_top1"] for r in a["history"]] == [r["ema_val_top1"] for r in b["history"]]


def test_all_regularizers_train_and_resume_bitwise(tmp_path, cifar, capsys):
    import train_helpers

    args = ("--epochs", "2", "--seed", "5", *ALL_ON)
    rc, run = _train(tmp_path, cifar, "straight", *args)
    assert rc == 0
    straight = ckpt.load(run / "last.pt")
    out = capsys.readouterr().out
    assert "EMA val top-1" in out and "weights)" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ema_val_top1"] is not None and 0 < r["ema_decay"] <= 0.9 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["best_weights"] in ("raw", "ema")
    best = max(max(r["val_top1"], r["ema_val_top1"]) for r in rows)
    assert summary["best_val_top1"] == best
    assert straight["ema"]["updates"] == 2 * (52 // 8)
    best_state = ckpt.load(run / "best.pt")
    weights, which = ckpt.selected_weights(best_state)
    assert which == summary["best_weights"] == best_state["best"]["weights"]
    assert weights is (best_state["ema"]["module"] if which == "ema" else best_state["model"])
    assert list(weights) == list(best_state["model"])
    assert straight["recipe"]["drop_path"] == 0.2 and straight["recipe"]["auto_augment"] == "rand-m9-n2"

    # without the regularizers the same seed trains differently
    rc, plain = _train(tmp_path, cifar, "plain", "--epochs", "1", "--seed", "5")
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train_loss"] != json.loads((plain / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]

    # stop after one epoch, resume
    rc, split = _train(tmp_path, cifar, "split", *args, "--stop-after-epochs", "1")
    assert rc == 0 and _resume(split) == 0
    _assert_same(straight, ckpt.load(split / "last.pt"))

    # Ctrl-C at the 4th training forward (epoch 1, step 3), resume
    train_helpers.reset_hooks()
    train_helpers.HOOKS["interrupt_at"] = 4
    rc, cut = _train(tmp_path, cifar, "interrupted", *args)
    assert rc == 130
    mid = ckpt.load(cut / "last.pt")
    assert (mid["epoch"], mid["step"]) == (0, 3) and mid["ema"]["updates"] == 3
    train_helpers.reset_hooks()
    assert _resume(cut) == 0
    _assert_same(straight, ckpt.load(cut / "last.pt"))


def test_trivial_augment_cutmix_only_resumes_bitwise(tmp_path, cifar):
    args = ("--epochs", "2", "--seed", "2", "--auto-augment", "trivial", "--cutmix", "1.0", "--mix-prob", "0.7",
            "--ema", "0.99")
    assert _train(tmp_path, cifar, "straight", *args)[0] == 0
    straight = ckpt.load(tmp_path / "straight" / "last.pt")
    rc, split = _train(tmp_path, cifar, "split", *args, "--stop-after-epochs", "1")
    assert rc == 0 and _resume(split) == 0
    _assert_same(straight, ckpt.load(split / "last.pt"))
