"""The model zoo: parameter counts, shapes at the default size and at 32 px, gradients,
torchvision/timm naming, and backend parity (triton through the interpreter vs torch).

Everything runs on one intra-op thread. The parity tests dominate (the Triton
interpreter at 32 px for the Inception family, whose three stride-2 stages need it); they
run at a test-only reduced width (``channel_divisor`` / width multipliers) and depth.
"""
import copy

import pytest
import torch

import vhist
from vhist.models.inception_v3 import InceptionOutputs

from conftest import DEVICE
from utils import assert_close

# Reference counts at 1000 classes and the default input size: torchvision's for ResNet,
# VGG, MobileNetV2, Inception-v3 and ViT-B/16; timm's for Inception-v4,
# Inception-ResNet-v2 and ViT-Ti/S/16; the table for AlexNet, MobileNetV1 and
# BN-Inception. Inception-ResNet-v1 has no reference: its count is re-derived by hand in
# test_inception_resnet_v1_count_from_paper.
EXPECTED_PARAMS = {
    "alexnet": 60_965_224,
    "alexnet_single_tower": 62_378_344,
    "vgg11": 132_863_336,
    "vgg11_lrn": 132_863_336,
    "vgg13": 133_047_848,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    "vgg11_bn": 132_868_840,
    "vgg13_bn": 133_053_736,
    "vgg16_bn": 138_365_992,
    "vgg19_bn": 143_678_248,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "mobilenet_v1": 4_231_976,
    "mobilenet_v2": 3_504_872,
    "bn_inception": 11_295_240,
    "inception_v3": 23_834_568,
    "inception_v4": 42_679_816,
    "inception_resnet_v1": 24_357_096,
    "inception_resnet_v2": 55_843_464,
    "vit_tiny_patch16": 5_717_416,
    "vit_small_patch16": 22_050_664,
    "vit_base_patch16": 86_567_656,
}
DEFAULT_SIZE = {"alexnet": 227, "alexnet_single_tower": 227, "inception_v3": 299, "inception_v4": 299,
                "inception_resnet_v1": 299, "inception_resnet_v2": 299}
# The zoo's models: tests/train_helpers.py registers tiny_* test models into the same
# registry when another test module imports it first.
MODELS = [name for name in vhist.list_models() if not name.startswith("tiny_")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these CPU-bound checks share the CI's 2 cores with other
    work, and oversubscribed threads make the backward passes several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_exactly_the_table():
    assert sorted(EXPECTED_PARAMS) == MODELS
    assert vhist.list_models("resnet*") == ["resnet101", "resnet18", "resnet34", "resnet50"]


def test_unknown_model_error():
    with pytest.raises(ValueError, match="unknown model 'resnet_51'.*resnet18.*`vhist models`"):
        vhist.create_model("resnet_51")
    with pytest.raises(ValueError, match="did you mean resnet18"):
        vhist.models.model_config("resnet19")


# The small-input stems' thresholds, as each family's module docstring documents them.
SMALL_BELOW = {"alexnet": 128, "resnet": 65, "inception": 75, "vgg": 64, "mobilenet": 64, "bn_inception": 64}


@pytest.mark.parametrize("name", MODELS)
def test_default_config_recorded_at_registration(name):
    config = vhist.models.model_config(name)
    assert config.image_size == DEFAULT_SIZE.get(name, 224)
    family = next((f for f in ("bn_inception", "inception", "alexnet", "resnet", "vgg", "mobilenet")
                   if name.startswith(f)), "vit")
    assert config.small_below == SMALL_BELOW.get(family, 64)
    with torch.device("meta"):
        model = vhist.create_model(name)
        assert model.default_config is config
        if hasattr(model, "small_input"):  # ViT changes its patch size instead (checked at 32 px below)
            assert not model.small_input
            assert vhist.create_model(name, image_size=config.small_below).small_input is False
            assert vhist.create_model(name, image_size=config.small_below - 1).small_input is True


@pytest.mark.parametrize("name", MODELS)
def test_param_count(name):
    with torch.device("meta"):
        model = vhist.create_model(name)
    assert n_params(model) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize(("name", "kwargs", "expected"), [
    ("inception_v3", dict(aux_logits=True), 27_161_264),           # torchvision's default layout
    ("bn_inception", dict(conv_bias=False), 11_285_224),            # the paper's bias-free convs
    ("inception_resnet_v1", dict(final_block=False), 22_756_328),   # Fig. 15's blocks only
])
def test_param_count_variants(name, kwargs, expected):
    with torch.device("meta"):
        model = vhist.create_model(name, **kwargs)
    assert n_params(model) == expected


def test_inception_resnet_v1_count_from_paper():
    """Inception-ResNet-v1 from the widths of the paper's Figs. 14 (stem), 10, 7, 11, 12,
    13 by hand: a conv+BN layer has k·k·cin·cout weights plus 2·cout BN parameters, a
    residual up-projection k·cin·cout + cout (bias, no BN)."""
    def cbn(cin, cout, kh, kw=None):
        return cin * cout * kh * (kw or kh) + 2 * cout

    def up(cin, cout):
        return cin * cout + cout

    stem = cbn(3, 32, 3) + cbn(32, 32, 3) + cbn(32, 64, 3) + cbn(64, 80, 1) + cbn(80, 192, 3) + cbn(192, 256, 3)
    block_a = 3 * cbn(256, 32, 1) + cbn(32, 32, 3) + 2 * cbn(32, 32, 3) + up(96, 256)
    red_a = cbn(256, 384, 3) + cbn(256, 192, 1) + cbn(192, 192, 3) + cbn(192, 256, 3)  # k, l, m, n
    block_b = 2 * cbn(896, 128, 1) + cbn(128, 128, 1, 7) + cbn(128, 128, 7, 1) + up(256, 896)
    red_b = 3 * cbn(896, 256, 1) + cbn(256, 384, 3) + cbn(256, 256, 3) + cbn(256, 256, 3) + cbn(256, 256, 3)
    block_c = 2 * cbn(1792, 192, 1) + cbn(192, 192, 1, 3) + cbn(192, 192, 3, 1) + up(384, 1792)
    fc = 1792 * 1000 + 1000
    figures = stem + 5 * block_a + red_a + 10 * block_b + red_b + 5 * block_c + fc
    assert figures == 22_756_328
    assert figures + block_c == EXPECTED_PARAMS["inception_resnet_v1"]  # + the final linear block8
    assert abs(EXPECTED_PARAMS["inception_resnet_v1"] - 24.4e6) < 0.05e6  # the "about 24.4M"


@pytest.mark.parametrize("name", MODELS)
def test_default_size_forward(name):
    """Eval mode, batch 1, at the paper's input size: (1, 1000) finite logits."""
    size = DEFAULT_SIZE.get(name, 224)
    model = vhist.create_model(name).eval()
    with vhist.use_backend("torch"), torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_small_input_train_step(name):
    """Training mode at 32 px (CIFAR), batch 2 (BN needs > 1 value per channel at the 1×1
    grids): (2, 10) finite logits, and every parameter gets a finite gradient."""
    model = vhist.create_model(name, num_classes=10, image_size=32).train()
    with vhist.use_backend("torch"):
        out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 10)
        assert torch.isfinite(out).all()
        out.square().mean().backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    bad = [k for k, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad[:5]}"
    # Conv biases directly before BN (bn_inception's reference layout) have gradients
    # that vanish mathematically; every other tensor must get a non-zero one.
    zero = [k for k, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert all(name == "bn_inception" and k.endswith("conv.bias") for k in zero), f"zero gradient for {zero[:5]}"


def test_inception_v3_aux_outputs():
    model = vhist.create_model("inception_v3", num_classes=10, image_size=32, aux_logits=True)
    x = torch.randn(2, 3, 32, 32)
    with vhist.use_backend("torch"):
        out = model.train()(x)
        assert isinstance(out, InceptionOutputs)
        assert out.logits.shape == (2, 10) and out.aux_logits.shape == (2, 10)
        (out.logits.sum() + out.aux_logits.sum()).backward()
        assert all(p.grad is not None for p in model.parameters())
        with torch.no_grad():
            assert model.eval()(x).shape == (2, 10)


def test_small_stems_are_the_documented_ones():
    with torch.device("meta"):
        r = vhist.create_model("resnet18", image_size=32)
        assert r.conv1.kernel_size == (3, 3) and r.conv1.stride == (1, 1)
        assert isinstance(r.maxpool, torch.nn.Identity)
        assert vhist.create_model("resnet18", image_size=65).conv1.kernel_size == (7, 7)
        v3 = vhist.create_model("inception_v3", image_size=32)
        assert v3.Conv2d_1a_3x3.conv.stride == (1, 1) and v3.Conv2d_2a_3x3.conv.padding == (1, 1)
        assert vhist.create_model("alexnet", image_size=32).features[0].kernel_size == (5, 5)
        assert vhist.create_model("vit_tiny_patch16", image_size=32).patch_size == 4


def test_resnet_adds_shortcut_in_fused_op(monkeypatch):
    """Every ResNet block joins its shortcut through the fused op's residual input, and
    defers its first pair's BN + ReLU to the second conv (vhist.ops.conv_bn_deferred)."""
    import vhist.nn.modules.conv as conv_module

    calls, deferred = [], []
    real, real_deferred = conv_module.VF.fused_conv_bn_act, conv_module.VF.conv_bn_deferred

    def spy(*args, **kwargs):
        calls.append(kwargs.get("residual") is not None)
        return real(*args, **kwargs)

    def spy_deferred(*args, **kwargs):
        deferred.append(kwargs.get("bias") is None)
        return real_deferred(*args, **kwargs)

    monkeypatch.setattr(conv_module.VF, "fused_conv_bn_act", spy)
    monkeypatch.setattr(conv_module.VF, "conv_bn_deferred", spy_deferred)
    model = vhist.create_model("resnet18", image_size=32, channel_divisor=16)
    with vhist.use_backend("torch"):
        model(torch.randn(2, 3, 32, 32))
    assert sum(calls) == 8  # 2 + 2 + 2 + 2 BasicBlocks
    assert len(calls) == 1 + 8 + 3  # stem, each block's second conv, three downsamples
    assert deferred == [True] * 8  # each block's first conv (no conv bias)


# Keys that torchvision's / timm's state_dicts contain (checked without them installed).
NAMING = {
    "resnet50": ["conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
                 "layer4.2.conv3.weight", "layer4.2.bn3.num_batches_tracked", "fc.bias"],
    "vgg16_bn": ["features.0.weight", "features.0.bias", "features.1.running_mean", "features.41.weight",
                 "classifier.0.weight", "classifier.3.weight", "classifier.6.bias"],
    "mobilenet_v2": ["features.0.0.weight", "features.0.1.weight", "features.1.conv.0.0.weight",
                     "features.1.conv.1.weight", "features.1.conv.2.running_var", "features.2.conv.0.0.weight",
                     "features.2.conv.1.1.bias", "features.2.conv.2.weight", "features.2.conv.3.weight",
                     "features.18.0.weight", "classifier.1.weight"],
    "inception_v3": ["Conv2d_1a_3x3.conv.weight", "Mixed_5b.branch_pool.bn.running_mean",
                     "Mixed_6e.branch7x7dbl_5.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.bias", "fc.weight"],
    "inception_v4": ["features.0.conv.weight", "features.3.conv.bn.weight", "features.4.branch1.3.conv.weight",
                     "features.10.branch1.2.conv.weight", "features.21.branch2_3b.bn.running_var",
                     "features.21.branch3.1.conv.weight", "last_linear.weight"],
    "inception_resnet_v2": ["conv2d_1a.conv.weight", "mixed_5b.branch3.1.bn.bias", "repeat.9.conv2d.bias",
                            "repeat_1.19.branch1.2.conv.weight", "mixed_7a.branch2.2.bn.running_mean",
                            "repeat_2.8.conv2d.weight", "block8.branch1.2.conv.weight", "conv2d_7b.bn.weight",
                            "classif.weight"],
    "vit_base_patch16": ["conv_proj.weight", "class_token", "encoder.pos_embedding",
                         "encoder.layers.encoder_layer_0.ln_1.weight",
                         "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
                         "encoder.layers.encoder_layer_11.self_attention.out_proj.bias",
                         "encoder.layers.encoder_layer_11.mlp.3.weight", "encoder.ln.bias", "heads.head.weight"],
}


@pytest.mark.parametrize("name", sorted(NAMING))
def test_state_dict_naming(name):
    kwargs = dict(aux_logits=True) if name == "inception_v3" else {}
    with torch.device("meta"):
        keys = set(vhist.create_model(name, **kwargs).state_dict())
    missing = [k for k in NAMING[name] if k not in keys]
    assert not missing, f"{name}: missing {missing}"


def test_models_cli(capsys):
    """``vhist models``: params and GMACs (FLOPs / 2 of the convs and matmuls) at the
    default size; ResNet-50's 4.09 and ViT-B/16's 17.56 GMACs are the published figures."""
    from vhist.__main__ import main, model_stats

    r50 = model_stats("resnet50")
    assert r50["params"] == EXPECTED_PARAMS["resnet50"] and r50["image_size"] == 224
    assert round(r50["gmacs"], 2) == 4.09
    assert round(model_stats("vit_base_patch16")["gmacs"], 2) == 17.56
    assert model_stats("inception_v3")["image_size"] == 299
    assert main(["models", "alexnet*"]) == 0
    out = capsys.readouterr().out
    assert "alexnet_single_tower" in out and "60,965,224" in out


def test_timm_vit_key_map():
    """timm's ViT keys (its layout, written out here) map one-to-one onto ours."""
    from vhist.models.vit import timm_to_vhist

    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias"]
    timm_keys = (["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                  "norm.bias", "head.weight", "head.bias"]
                 + [f"blocks.{i}.{k}" for i in range(12) for k in per_block])
    with torch.device("meta"):
        ours = set(vhist.create_model("vit_tiny_patch16").state_dict())
    mapped = timm_to_vhist({k: None for k in timm_keys})
    assert len(mapped) == len(timm_keys) and set(mapped) == ours


# Backend parity: the triton backend (compiled on CUDA, interpreted on CPU) against the
# torch backend, same weights, train and eval mode, fp32. Reduced widths/depths keep the
# interpreter fast; the code paths are those of the full models.
PARITY = [
    # (model, kwargs, image size)
    ("alexnet", dict(channel_divisor=16), 16),                                   # grouped convs, ReLU epilogue, LRN
    ("vgg11_bn", dict(channel_divisor=16), 32),                                  # biased conv + BN modules
    ("resnet18", dict(channel_divisor=16), 8),                                   # BasicBlock residual
    ("resnet50", dict(channel_divisor=16), 8),                                   # Bottleneck residual
    ("mobilenet_v1", dict(alpha=0.125), 8),                                      # depthwise + pointwise
    ("mobilenet_v2", dict(width_mult=0.25), 16),                                 # inverted residual
    ("bn_inception", dict(channel_divisor=16, conv_bias=False), 16),             # fused modules
    ("inception_v3", dict(channel_divisor=16, aux_logits=True), 32),             # 1×7/7×1, aux head
    ("inception_v4", dict(channel_divisor=16, num_blocks=(1, 1, 1)), 32),
    # v1 is built from the same block classes as v2 (only widths differ).
    ("inception_resnet_v2", dict(channel_divisor=16, num_blocks=(1, 1, 1)), 32),  # scaled residuals
    ("vit_tiny_patch16", dict(channel_divisor=8, depth=2), 16),                  # patch conv + attention
]
# The three-way rule (STYLE.md) in fp32: against an fp64 run of the torch backend, the
# triton backend's error must stay within PARITY_FACTOR times the torch backend's own
# fp32 error (plus a floor of a few fp32 ulps of the tensor's scale). Plain tolerances
# do not work here: in training mode the BNs of the 1×1 grids normalize 2 values per
# channel, which amplifies any fp32 rounding in the backward pass by 1/sigma, for the
# torch backend as much as for ours.
# The floor is relative to the tensor's scale. In training, a single factor comparison is
# noisy where BN sees 2 values per channel (the batch variance of two nearly equal conv
# outputs has a relative error of ulp·|x|/|x1 − x2| for either backend), hence 1e-4 there;
# a wrong kernel gives errors of order 1.
PARITY_FACTOR = 10.0
PARITY_FLOOR = {"train": 1e-4, "eval": 1e-6}


def _assert_parity(ours, theirs, reference, name, mode):
    if reference is None or ours is None or theirs is None:
        assert ours is None and theirs is None and reference is None, f"{name}: gradient only on some backends"
        return
    if not reference.is_floating_point():
        assert torch.equal(ours, theirs) and torch.equal(ours, reference), f"{name}: {ours} != {theirs}"
        return
    reference = reference.double()
    scale = reference.abs().max().item()
    ours_err = (ours.double() - reference).abs().max().item()
    theirs_err = (theirs.double() - reference).abs().max().item()
    assert ours_err <= PARITY_FACTOR * theirs_err + PARITY_FLOOR[mode] * max(scale, 1.0), (
        f"{name}: triton error {ours_err:.3e} > {PARITY_FACTOR} x torch's {theirs_err:.3e} "
        f"(fp64 reference scale {scale:.3e})")


def _step(model, x, backend):
    """Forward + backward on ``backend``; returns the output, the input gradient, every
    parameter gradient and the buffers (running statistics) afterwards."""
    x = x.detach().clone().requires_grad_()
    with vhist.use_backend(backend):
        out = model(x)
        logits = out.logits + out.aux_logits if isinstance(out, InceptionOutputs) else out
        # A fixed random cotangent exercises every output element.
        cotangent = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype)
        logits.backward(cotangent)
    grads = {k: p.grad for k, p in model.named_parameters()}
    return logits.detach(), x.grad, grads, {k: b.clone() for k, b in model.named_buffers()}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("name", "kwargs", "size"), PARITY, ids=[p[0] for p in PARITY])
def test_backend_parity(name, kwargs, size, mode):
    torch.manual_seed(0)
    torch_model = vhist.create_model(name, num_classes=10, image_size=size, **kwargs).to(DEVICE)
    for m in torch_model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # dropout is torch's own op: keep the runs deterministic and comparable
    torch_model.train(mode == "train")
    triton_model = copy.deepcopy(torch_model)
    fp64_model = copy.deepcopy(torch_model).double()
    # Training needs 2 samples for the BNs of the 1×1 grids; eval runs one.
    x = torch.randn(2 if mode == "train" else 1, 3, size, size, device=DEVICE)
    reference = _step(fp64_model, x.double(), "torch")
    theirs = _step(torch_model, x, "torch")
    ours = _step(triton_model, x, "triton")
    _assert_parity(ours[0], theirs[0], reference[0], f"{name} output", mode)
    _assert_parity(ours[1], theirs[1], reference[1], f"{name} input grad", mode)
    for key in reference[2]:
        _assert_parity(ours[2][key], theirs[2][key], reference[2][key], f"{name} grad {key}", mode)
    for key in reference[3]:
        _assert_parity(ours[3][key], theirs[3][key], reference[3][key], f"{name} buffer {key}", mode)


# Strict state_dict loading from torchvision / timm and identical outputs (eval mode).
TORCHVISION = [
    # (our name, torchvision builder, builder kwargs, our kwargs, image size)
    ("resnet18", "resnet18", {}, {}, 224),
    ("resnet50", "resnet50", {}, {}, 224),
    ("vgg11_bn", "vgg11_bn", {}, {}, 224),
    ("vgg16", "vgg16", {}, {}, 224),
    ("mobilenet_v2", "mobilenet_v2", {}, {}, 224),
    ("inception_v3", "inception_v3", dict(aux_logits=True, init_weights=False, transform_input=False),
     dict(aux_logits=True), 299),
    ("vit_base_patch16", "vit_b_16", {}, {}, 224),
]


def _compare(ours, theirs, state_dict, size):
    ours.load_state_dict(state_dict, strict=True)
    ours.eval()
    theirs.eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad(), vhist.use_backend("torch"):
        assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4, name="logits")


@pytest.mark.parametrize(("name", "builder", "tv_kwargs", "kwargs", "size"), TORCHVISION,
                         ids=[t[0] for t in TORCHVISION])
def test_torchvision_state_dict(name, builder, tv_kwargs, kwargs, size):
    models = pytest.importorskip("torchvision.models")
    theirs = getattr(models, builder)(weights=None, **tv_kwargs)
    _compare(vhist.create_model(name, **kwargs), theirs, theirs.state_dict(), size)


@pytest.mark.parametrize(("name", "timm_name", "size"), [
    ("inception_v4", "inception_v4", 299),
    ("inception_resnet_v2", "inception_resnet_v2", 299),
    ("vit_tiny_patch16", "vit_tiny_patch16_224", 224),
])
def test_timm_state_dict(name, timm_name, size):
    timm = pytest.importorskip("timm")
    from vhist.models.vit import timm_to_vhist

    theirs = timm.create_model(timm_name, pretrained=False)
    state_dict = theirs.state_dict()
    if name.startswith("vit"):
        state_dict = timm_to_vhist(state_dict)
    _compare(vhist.create_model(name), theirs, state_dict, size)


def test_vit_block_launches():
    """One ViT encoder block in training on the triton backend (launches recorded, not
    run): forward LN, attention, add + LN, bias + GELU; backward GELU (dz, bias-gradient
    sum), LN with the residual gradient (2), attention (preprocess, dK/dV, dQ), LN (2)."""
    from utils import run_recording_script

    counts = run_recording_script("import json; from vhist.models.stats import block_launches; "
                                  "print(json.dumps([block_launches('vit_tiny_patch16'), "
                                  "block_launches('resnet18')]))")
    assert counts == [[4, 9], None]


def test_vit_fp16_autocast_matches_torch():
    """A ViT training step under fp16 autocast on the triton backend (the fp32 residual
    stream meets bf16/fp16 branches in add + LN; the fc1 bias is cast as addmm's would
    be): the output and gradients within twice the torch backend's own error against an
    fp32 run (the interpreter's bf16 tl.dot is wrong, so fp16 here)."""
    torch.manual_seed(0)
    model = vhist.create_model("vit_tiny_patch16", image_size=16, channel_divisor=8, depth=2, num_classes=5).train()
    x = torch.randn(2, 3, 16, 16)
    probes = (model.encoder.layers[0].mlp[0].bias, model.encoder.layers[0].ln_2.weight,
              model.encoder.layers[1].self_attention.in_proj_weight)
    results = []
    for backend, autocast in (("triton", True), ("torch", True), ("torch", False)):
        model.zero_grad()
        with vhist.use_backend(backend), torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            y = model(x)
        y.float().sum().backward()
        results.append([y.detach().float()] + [p.grad.clone() for p in probes])
    ours, theirs, reference = results
    for name, a, b, r in zip(("output", "fc1.bias", "ln_2.weight", "in_proj_weight"), ours, theirs, reference):
        err, torch_err = (a - r).abs().max().item(), (b - r).abs().max().item()
        assert err <= 2 * torch_err + 1e-4, f"{name}: {err:.3e} > 2 x torch's {torch_err:.3e}"
