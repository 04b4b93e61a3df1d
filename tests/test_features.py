"""Backbone features (timm's ``features_only``): per-stage maps with their channels and
reductions for every family, ``out_indices``, FeatureInfo's methods, and
``forward_features`` / ``forward_head`` on every zoo model."""
import copy

import pytest
import torch

import vhist
from vhist.models.features import FeatureInfo

from utils import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


FAMILIES = [
    # (model, kwargs, image size, expected reductions, expected channels (at the kwargs' widths))
    ("resnet50", dict(channel_divisor=16), 96, [2, 4, 8, 16, 32], [4, 16, 32, 64, 128]),   # timm's resnet
    ("resnet18", dict(channel_divisor=16), 32, [1, 2, 4, 8], [4, 8, 16, 32]),          # CIFAR stem: no stem stage
    ("vgg16_bn", dict(channel_divisor=16), 64, [2, 4, 8, 16, 32], [4, 8, 16, 32, 32]),
    ("alexnet", dict(channel_divisor=16), 227, [4, 8, 16, 32], [6, 16, 16, 16]),
    ("mobilenet_v1", dict(alpha=0.25), 64, [2, 4, 8, 16, 32], [16, 32, 64, 128, 256]),
    ("mobilenet_v2", dict(width_mult=0.25), 64, [2, 4, 8, 16, 32], [8, 8, 8, 24, 1280]),
    ("bn_inception", dict(channel_divisor=16), 64, [2, 4, 8, 16, 32], [4, 12, 20, 38, 64]),
    ("inception_v3", dict(channel_divisor=16), 96, [2, 4, 8, 16, 32], [4, 12, 18, 48, 128]),  # timm's stages
    ("inception_v4", dict(channel_divisor=16, num_blocks=(1, 1, 1)), 96, [2, 4, 8, 16, 32], [4, 12, 24, 64, 96]),
    ("inception_resnet_v2", dict(channel_divisor=16, num_blocks=(1, 1, 1)), 96, [2, 4, 8, 16, 32],
     [4, 12, 20, 68, 96]),
]


@pytest.mark.parametrize(("name", "kwargs", "size", "reductions", "channels"), FAMILIES,
                         ids=[f[0] for f in FAMILIES])
def test_features_only_shapes_and_reductions(name, kwargs, size, reductions, channels):
    model = vhist.create_model(name, image_size=size, features_only=True, **kwargs).eval()
    info = model.feature_info
    assert info.reduction() == reductions and info.channels() == channels
    x = torch.randn(2, 3, size, size)
    with vhist.use_backend("torch"), torch.no_grad():
        maps = model(x)
    assert len(maps) == len(reductions)
    for m, c, r in zip(maps, channels, reductions):
        # The nominal reduction, as timm reports it: padded stages divide the size exactly;
        # unpadded convs and pools lose a border (at most 96 input pixels in the zoo).
        assert m.shape[:2] == (2, c) and (size - 96) / r <= m.shape[-1] <= size / r, (m.shape, r)
    # The last map is forward_features' output of the full model with the same weights.
    full = vhist.create_model(name, image_size=size, **kwargs).eval()
    full.load_state_dict(model.model.state_dict(), strict=False)
    with vhist.use_backend("torch"), torch.no_grad():
        assert torch.equal(maps[-1], full.forward_features(x))


def test_vit_features_are_block_maps():
    model = vhist.create_model("vit_tiny_patch16", image_size=32, channel_divisor=8, depth=3, features_only=True,
                               out_indices=(0, -1)).eval()
    assert model.feature_info.reduction() == [4, 4] and model.feature_info.channels() == [24, 24]
    assert model.feature_info.module_name() == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_2"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first, last = model(x)
        tokens = model.model.encoder.layers[0](model.model.encoder.dropout(
            torch.cat([model.model.class_token.expand(2, -1, -1),
                       model.model.conv_proj(x).flatten(2).transpose(1, 2)], 1) + model.model.encoder.pos_embedding))
    assert first.shape == last.shape == (2, 24, 8, 8)
    # the patch tokens of block 0, class token dropped, in (B, D, H, W) order
    assert torch.equal(first, tokens[:, 1:].transpose(1, 2).reshape(2, 24, 8, 8))


def test_out_indices_and_feature_info_methods():
    model = vhist.create_model("resnet50", image_size=96, channel_divisor=16, features_only=True, out_indices=(1, 3))
    info = model.feature_info
    assert info.channels() == [16, 64] and info.reduction() == [4, 16]
    assert info.module_name() == ["layer1", "layer3"] and info.channels(0) == 4 and info.reduction([0, 4]) == [2, 32]
    assert len(info) == 5 and info[4] == dict(num_chs=128, reduction=32, module="layer4")
    assert info.get_dicts(keys=["num_chs"]) == [{"num_chs": 16}, {"num_chs": 64}]
    assert isinstance(info, FeatureInfo) and "fc" not in dict(model.named_parameters()).keys().__str__()
    with torch.no_grad():
        maps = model.eval()(torch.randn(1, 3, 96, 96))
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 24, 24), (64, 6, 6)]
    twin = copy.deepcopy(model)  # records its own maps (an EMA of a backbone, say)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
        assert not torch.equal(twin.eval()(torch.ones(1, 3, 96, 96))[0], model(torch.ones(1, 3, 96, 96))[0])
    with pytest.raises(ValueError, match=r"out_indices \(0, 5\) out of range: ResNet has 5 stages"):
        vhist.create_model("resnet18", image_size=96, channel_divisor=16, features_only=True, out_indices=(0, 5))
    with pytest.raises(ValueError, match="needs features_only=True"):
        vhist.create_model("resnet18", out_indices=(1,))


# The zoo, without the tiny_* nets that tests/train_helpers.py registers for the training tests.
ZOO = [n for n in vhist.list_models() if not n.startswith("tiny_")]


@pytest.mark.parametrize("name", ZOO)
def test_forward_features_and_head(name):
    """timm's semantics: forward = forward_head(forward_features(x)); pre_logits gives the
    classifier's input."""
    kwargs = dict(depth=2) if name.startswith("vit") else {}
    with torch.device("meta"):
        model = vhist.create_model(name, num_classes=10, image_size=32, **kwargs)
    model = model.to_empty(device="cpu").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.05)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
    head = model.get_submodule(model.pretrained_keys["classifier"][0] if isinstance(
        model.pretrained_keys["classifier"], tuple) else model.pretrained_keys["classifier"])
    x = torch.randn(1, 3, 32, 32)
    with vhist.use_backend("torch"), torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
        assert torch.equal(logits, model(x))
    assert logits.shape == (1, 10) and pooled.shape == (1, head.in_features)
    assert torch.equal(head(pooled), logits)
