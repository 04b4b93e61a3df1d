"""Initialization schemes (``create_model(init=...)``) and the recipes' ``init``."""
import json
import math

import pytest
import torch
from torch import nn

import vhist
from vhist.__main__ import main
from vhist.models.initialization import INITS
from vhist.train import checkpoint as ckpt
from vhist.train.recipes import RECIPES

import train_helpers
from train_helpers import one_thread_fresh_hooks, write_cifar10  # noqa: F401

TRUNC_2SD = 0.8796  # std of a unit normal truncated at +-2


def _build(name, init, seed=0, **kwargs):
    torch.manual_seed(seed)
    return vhist.create_model(name, num_classes=10, image_size=32, init=init, **kwargs)


def _layers(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


def _close(value, expected, rel=0.1):
    assert abs(value - expected) <= rel * expected, (value, expected)


def test_alexnet_paper_init_is_section_5_and_the_default():
    for init in ("paper", None):  # None: the family's own, which is the paper's
        model = _build("alexnet", init)
        convs, linears = _layers(model, nn.Conv2d), _layers(model, nn.Linear)
        for m in convs + linears:
            _close(m.weight.std().item(), 0.01, rel=0.05)
        ones = [convs[1], convs[3], convs[4], linears[0], linears[1]]
        for m in convs + linears:
            assert torch.all(m.bias == (1.0 if any(m is o for o in ones) else 0.0))


def test_alexnet_modern_and_torch_init():
    model = _build("alexnet", "modern")
    convs, linears = _layers(model, nn.Conv2d), _layers(model, nn.Linear)
    for m in convs:  # Kaiming normal, fan_out, ReLU
        fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
        _close(m.weight.std().item(), math.sqrt(2 / fan_out))
        assert torch.all(m.bias == 0)
    for m in linears[:-1]:  # hidden FC layers: Kaiming normal, fan_in
        _close(m.weight.std().item(), math.sqrt(2 / m.in_features), rel=0.05)
    _close(linears[-1].weight.std().item(), 0.01, rel=0.15)
    model = _build("alexnet", "torch")
    # PyTorch's kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases likewise
    for m in _layers(model, nn.Conv2d) + _layers(model, nn.Linear):
        bound = 1 / math.sqrt(m.weight[0].numel())
        assert m.weight.abs().max().item() <= bound * (1 + 1e-6)  # float32 rounding of the bound
        _close(m.weight.std().item(), bound / math.sqrt(3), rel=0.1)
        assert m.bias.abs().max().item() <= bound and m.bias.abs().max().item() > 0


def test_torch_init_equals_a_plain_pytorch_layer():
    model = _build("resnet18", "torch", channel_divisor=8)
    conv, bn, fc = model.conv1, model.bn1, model.fc
    torch.manual_seed(0)
    ref = nn.Conv2d(3, conv.out_channels, 3, padding=1, bias=False)
    # the model's first reset draws conv1's weight first, from the same seed
    torch.manual_seed(0)
    vhist.models.initialize(model, "torch")
    torch.testing.assert_close(model.conv1.weight, ref.weight, rtol=0, atol=0)
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert fc.bias.abs().max() > 0  # uniform biases, not the modern zeros


@pytest.mark.parametrize("name,kwargs", [
    ("inception_v3", dict(channel_divisor=8)),
    ("inception_v4", dict(channel_divisor=8, num_blocks=(1, 1, 1))),
    ("inception_resnet_v2", dict(channel_divisor=8, num_blocks=(1, 1, 1))),
    ("bn_inception", dict(channel_divisor=8)),
])
def test_inception_paper_init_is_tf_slim(name, kwargs):
    model = _build(name, "paper", **kwargs)
    big = [m for m in _layers(model, nn.Conv2d) if m.weight.numel() >= 4096]
    assert big
    for m in big:  # truncated normal, std sqrt(1.3 * 2 / fan_in) before the cut at 2 std
        std = math.sqrt(2.6 / m.weight[0].numel())
        assert m.weight.abs().max().item() <= 2 * std + 1e-6
        _close(m.weight.std().item(), std * TRUNC_2SD)
    fc = _layers(model, nn.Linear)[-1]
    bound = math.sqrt(6 / (fc.in_features + fc.out_features))  # Xavier uniform
    assert fc.weight.abs().max().item() <= bound and torch.all(fc.bias == 0)


def test_mobilenet_vgg_resnet_paper_init():
    for name in ("mobilenet_v1", "mobilenet_v2"):
        model = _build(name, "paper")
        for m in _layers(model, nn.Conv2d) + _layers(model, nn.Linear):
            assert m.weight.abs().max().item() <= 0.18 + 1e-6
        w = torch.cat([m.weight.flatten() for m in _layers(model, nn.Conv2d)])
        _close(w.std().item(), 0.09 * TRUNC_2SD, rel=0.05)
    vgg = _build("vgg11_bn", "paper", channel_divisor=4)
    for m in _layers(vgg, nn.Conv2d) + _layers(vgg, nn.Linear):
        _close(m.weight.std().item(), 0.01, rel=0.2)
        assert torch.all(m.bias == 0)
    resnet = _build("resnet18", "paper", zero_init_residual=True)
    for m in _layers(resnet, nn.Conv2d):
        if m.weight.numel() >= 4096:
            _close(m.weight.std().item(), math.sqrt(2 / m.weight[0].numel()))
    assert all(torch.all(b.bn2.weight == 0) for b in resnet.modules() if type(b).__name__ == "BasicBlock")


def test_vit_inits():
    # timm's trunc_normal_(std=0.02) cuts at +-2 absolute, 100 std: the std stays 0.02
    modern = _build("vit_tiny_patch16", "modern", depth=2)
    for m in _layers(modern, nn.Linear):
        _close(m.weight.std().item(), 0.02, rel=0.1)
        assert torch.all(m.bias == 0)
    _close(modern.encoder.layers[0].self_attention.in_proj_weight.std().item(), 0.02, rel=0.05)
    paper = _build("vit_tiny_patch16", "paper", depth=2)
    assert torch.all(paper.heads.head.weight == 0) and torch.all(paper.class_token == 0)


def test_every_model_takes_every_init_and_bad_ones_are_refused():
    for name in ("alexnet", "vgg11", "resnet18", "mobilenet_v2", "vit_tiny_patch16"):
        for init in INITS:
            kwargs = {"depth": 1} if name.startswith("vit") else {"channel_divisor": 4} if name != "mobilenet_v2" \
                else {"width_mult": 0.25}
            model = _build(name, init, **kwargs)
            assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="init must be one of paper, modern, torch"):
        vhist.create_model("alexnet", init="kaiming")
    with pytest.raises(ValueError, match="no paper initialization"):
        vhist.create_model("tiny_train_net", num_classes=4, init="paper")


def test_every_recipe_names_its_init():
    for name, recipe in RECIPES.items():
        expected = "torch" if name.startswith("seed-") else "paper" if name.startswith("paper-") else "modern"
        assert recipe.init == expected, name
    with pytest.raises(ValueError, match="--init must be one of"):
        from vhist.train.recipes import get_recipe

        get_recipe("modern", init="xavier")


def test_run_prints_and_records_init_and_old_checkpoints_load(tmp_path, capsys):
    data = write_cifar10(tmp_path / "data")
    args = ["train", "--model", "tiny_train_net", "--recipe", "seed-alexnet", "--epochs", "1", "--batch-size", "8",
            "--backend", "torch", "--workers", "0", "--data", data, "--out-dir", str(tmp_path), "--run-name", "r"]
    assert main(args) == 0
    assert '"init": "torch"' in capsys.readouterr().out
    run = tmp_path / "r"
    assert json.loads((run / "config.json").read_text())["recipe"]["init"] == "torch"
    state = ckpt.load(run / "best.pt")
    assert state["recipe"]["init"] == "torch"
    del state["recipe"]["init"]  # a checkpoint written before recipes had an init
    ckpt.save_atomic(state, run / "old.pt")
    assert main(["eval", "--checkpoint", str(run / "old.pt"), "--backend", "torch", "--workers", "0"]) == 0
    assert train_helpers.HOOKS["calls"] > 0


def test_resume_keeps_the_checkpoints_recipe(tmp_path):
    """A recipe redefined after a run started (issue 26 changed the imagenette warm-up)
    does not change the run when it resumes; a checkpoint without ``init`` resumes too."""
    data = write_cifar10(tmp_path / "data")
    args = ["train", "--model", "tiny_train_net", "--recipe", "modern", "--epochs", "2", "--stop-after-epochs", "1",
            "--batch-size", "8", "--backend", "torch", "--workers", "0", "--data", data, "--out-dir", str(tmp_path),
            "--run-name", "r"]
    assert main(args) == 0
    run = tmp_path / "r"
    state = ckpt.load(run / "last.pt")
    state["recipe"]["warmup_epochs"] = 0.5  # what the run was started with, unlike the named recipe's 5
    del state["recipe"]["init"]
    ckpt.save_atomic(state, run / "last.pt")
    assert main(["train", "--resume", str(run / "last.pt"), "--backend", "torch", "--workers", "0"]) == 0
    recipe = json.loads((run / "config.json").read_text())["recipe"]
    assert recipe["warmup_epochs"] == 0.5 and recipe["init"] == "modern"
