"""Pretrained weights from files (vhist.models.pretrained): every wrapper form of a
checkpoint written by the torch backend's models, classifier re-initialization, the
1-channel stem adaptation, bad files; and the README's fine-tuning command end to end."""
import pytest
import torch

import vhist
from vhist.__main__ import main
from vhist.models.pretrained import adapt_input_conv, load_pretrained, read_state_dict

from train_helpers import one_thread_fresh_hooks, write_image_folder  # noqa: F401
from utils import assert_close

SMALL = dict(image_size=32, channel_divisor=16)


def _logits(model, x):
    with vhist.use_backend("torch"), torch.no_grad():
        return model.eval()(x)


def _source(seed=0, num_classes=10, name="resnet18", **kwargs):
    torch.manual_seed(seed)
    model = vhist.create_model(name, num_classes=num_classes, **(kwargs or SMALL))
    for m in model.modules():  # non-trivial running statistics, so that buffers are checked too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("form", ["plain", "state_dict", "model", "state_dict_ema", "module.", "_orig_mod."])
def test_load_each_wrapper_form(tmp_path, form):
    source = _source()
    sd = source.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": torch.tensor(3)}, "model": {"model": sd},
           # timm prefers the EMA weights; the raw ones beside them must not be taken
           "state_dict_ema": {"state_dict": {k: torch.zeros_like(v) for k, v in sd.items()}, "state_dict_ema": sd},
           "module.": {"module." + k: v for k, v in sd.items()},
           "_orig_mod.": {"state_dict": {"_orig_mod." + k: v for k, v in sd.items()}}}[form]
    path = tmp_path / "weights.pth"
    torch.save(obj, path)
    model = vhist.create_model("resnet18", num_classes=10, pretrained=str(path), **SMALL)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_logits(model, x), _logits(source, x))


def test_load_safetensors(tmp_path):
    """timm's Hub files are .safetensors: written here by the format's spec (8-byte
    little-endian header length, JSON header, raw little-endian bytes)."""
    import json

    source = _source()
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    codes = {torch.float32: "F32", torch.int64: "I64"}
    for key, value in source.state_dict().items():
        raw = value.contiguous().numpy().tobytes()
        header[key] = {"dtype": codes[value.dtype], "shape": list(value.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + b"".join(chunks))
    model = vhist.create_model("resnet18", num_classes=10, pretrained=str(tmp_path / "model.safetensors"), **SMALL)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_logits(model, x), _logits(source, x))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"not json at all!")
    with pytest.raises(ValueError, match="cannot be read as a torch checkpoint .not a safetensors header"):
        read_state_dict(tmp_path / "bad.safetensors")


def test_head_reinitialized_for_other_classes(tmp_path, caplog):
    source = _source(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with caplog.at_level("INFO", logger="vhist.models._registry"):
        vhist.create_model("resnet18", num_classes=10, pretrained=str(tmp_path / "w.pth"), **SMALL)
    assert "classifier fc re-initialized for 10 classes" in caplog.text
    torch.manual_seed(5)
    fresh = vhist.create_model("resnet18", num_classes=10, **SMALL)
    torch.manual_seed(5)
    model = vhist.create_model("resnet18", num_classes=10, **SMALL)
    report = load_pretrained(model, tmp_path / "w.pth")
    assert report.reinitialized == ["fc"] and report.num_classes == (1000, 10)
    assert "classifier fc re-initialized for 10 classes (the checkpoint's has 1000)" in report.message()
    assert report.tensors == len(model.state_dict()) - 2
    # The head keeps the fresh model's initialization; everything else is the checkpoint's.
    assert torch.equal(model.fc.weight, fresh.fc.weight) and torch.equal(model.fc.bias, fresh.fc.bias)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = [m.eval().forward_head(m.forward_features(x), pre_logits=True) for m in (model, source)]
    assert torch.equal(*pooled)


def test_one_channel_stem_adapted_to_rgb(tmp_path):
    """A 1-channel checkpoint's stem, repeated over RGB and scaled by 1/3 (timm's repeat
    rule): an RGB image of a gray scene gives the gray model's logits."""
    source = _source()
    gray_stem = torch.nn.Conv2d(1, source.conv1.out_channels, 3, 1, 1, bias=False).weight.detach()
    sd = source.state_dict()
    sd["conv1.weight"] = gray_stem
    torch.save(sd, tmp_path / "gray.pth")
    model = vhist.create_model("resnet18", num_classes=10, **SMALL)
    report = load_pretrained(model, tmp_path / "gray.pth")
    assert report.stem_channels == 1 and "adapted from the checkpoint's 1-channel" in report.message()
    assert torch.equal(model.conv1.weight, gray_stem.repeat(1, 3, 1, 1) * (1 / 3))
    # The gray model: the checkpoint's stem on one channel (zero weights on the others).
    reference = _source()
    with torch.no_grad():
        reference.conv1.weight.zero_()[:, :1] = gray_stem
    gray = torch.randn(2, 1, 32, 32)
    assert_close(_logits(model, gray.expand(-1, 3, -1, -1)),
                 _logits(reference, torch.cat([gray, torch.zeros(2, 2, 32, 32)], 1)), atol=1e-5, rtol=1e-5)
    # timm's own direction: RGB weights to one channel sum over the input channels
    rgb = torch.randn(4, 3, 3, 3)
    assert torch.equal(adapt_input_conv(1, rgb), rgb.sum(1, keepdim=True))


def test_timm_vit_checkpoint_keys_mapped(tmp_path):
    kwargs = dict(image_size=32, channel_divisor=8, depth=2)
    source = _source(name="vit_tiny_patch16", **kwargs)
    from_ours = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding",
                 "patch_embed.proj.weight": "conv_proj.weight", "patch_embed.proj.bias": "conv_proj.bias",
                 "norm.weight": "encoder.ln.weight", "norm.bias": "encoder.ln.bias", "head.weight": "heads.head.weight",
                 "head.bias": "heads.head.bias"}
    per_block = {"norm1": "ln_1", "attn.qkv.weight": "self_attention.in_proj_weight",
                 "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
                 "norm2": "ln_2", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
    for i in range(2):
        for timm_key, ours in per_block.items():
            for suffix in ("", ".weight", ".bias"):
                from_ours[f"blocks.{i}.{timm_key}{suffix}"] = f"encoder.layers.encoder_layer_{i}.{ours}{suffix}"
    sd = source.state_dict()
    timm_sd = {k: sd[v] for k, v in from_ours.items() if v in sd}
    assert len(timm_sd) == len(sd)
    torch.save({"state_dict_ema": timm_sd}, tmp_path / "vit.pth")
    model = vhist.create_model("vit_tiny_patch16", num_classes=10, pretrained=str(tmp_path / "vit.pth"), **kwargs)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_logits(model, x), _logits(source, x))


def test_inception_v3_without_aux_head_takes_torchvision_weights(tmp_path):
    """torchvision's Inception-v3 weights hold the auxiliary head; the default model
    (aux_logits=False) drops those tensors, as timm does, and loads the rest strictly."""
    kwargs = dict(image_size=32, channel_divisor=16)
    source = _source(name="inception_v3", aux_logits=True, **kwargs)
    torch.save(source.state_dict(), tmp_path / "v3.pth")
    model = vhist.create_model("inception_v3", num_classes=10, pretrained=str(tmp_path / "v3.pth"), **kwargs)
    assert model.AuxLogits is None
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_logits(model, x), _logits(source, x))


def test_bad_weights_files(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nope.pth do not exist"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as a torch checkpoint"):
        read_state_dict(tmp_path / "text.pth")
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="hold no state_dict .top-level keys: epoch, optimizer"):
        read_state_dict(tmp_path / "empty.pth")
    torch.save(_source(name="mobilenet_v1", image_size=32, alpha=0.25).state_dict(), tmp_path / "mnet.pth")
    with pytest.raises(ValueError, match=r"do not fit this ResNet: \d+ missing \(conv1.weight, bn1.weight, "
                                         r"bn1.bias, \.\.\.\); \d+ unexpected"):
        vhist.create_model("resnet18", num_classes=10, pretrained=str(tmp_path / "mnet.pth"), **SMALL)
    # the CLI: one line, exit code 2
    data = write_image_folder(tmp_path / "data", per_class=2, n_test=1)
    for weights, message in ((tmp_path / "nope.pth", "do not exist"), (tmp_path / "mnet.pth", "do not fit")):
        rc = main(["train", "--model", "resnet18", "--pretrained", str(weights), "--data", data, "--epochs", "1",
                   "--image-size", "32", "--out-dir", str(tmp_path / "runs"), "--workers", "0", "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, err


def test_finetune_resnet50_from_weights_file_then_export(tmp_path, capsys):
    """The README's command: ``vhist train --model resnet50 --pretrained resnet50.pth
    --data <imagenette> --recipe finetune`` (smaller images and one short epoch here),
    then ``vhist export`` of its best.pt, run in ONNX Runtime against vhist's logits."""
    onnxruntime = pytest.importorskip("onnxruntime")  # the dev extra installs it
    weights = tmp_path / "resnet50.pth"
    torch.save({"model": _source(name="resnet50", num_classes=1000, image_size=224).state_dict()}, weights)
    data = write_image_folder(tmp_path / "data", per_class=4, n_test=2)
    rc = main(["train", "--model", "resnet50", "--pretrained", str(weights), "--data", data, "--recipe", "finetune",
               "--epochs", "1", "--batch-size", "4", "--image-size", "72", "--out-dir", str(tmp_path / "runs"),
               "--run-name", "ft", "--workers", "0", "--device", "cpu", "--backend", "torch"])
    out = capsys.readouterr().out
    assert rc == 0
    # the README's line, for 3 classes here
    assert f"pretrained: 318 tensors from {weights}; classifier fc re-initialized for 3 classes (the checkpoint's " \
           "has 1000)" in out
    assert "recipe finetune" in out
    best = tmp_path / "runs" / "ft" / "best.pt"
    assert main(["export", "--checkpoint", str(best), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "53 BatchNorms folded" in out and "ONNX Runtime (CPU) reproduces vhist's logits" in out
    from vhist.train import checkpoint as ckpt

    model = ckpt.build_model(ckpt.load(best))
    session = onnxruntime.InferenceSession(str(best.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 72, 72)
    ours = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert_close(ours, _logits(model, x), atol=1e-4, rtol=1e-4)
