"""vhist export: the eval model traced on the torch backend with BatchNorm folded into
the convs, to ONNX (run in ONNX Runtime on the CPU) and to a torch.export program (saved,
loaded, run), with logits matching vhist's; bad input. The fine-tune + ``vhist export``
CLI path of the README is in test_pretrained.py."""
import pytest
import torch

import vhist
from vhist.__main__ import main
from vhist.export import export_model, run_onnx, trace_eval_model

from utils import assert_close, one_thread  # noqa: F401


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name, **kwargs):
    """A small model with non-trivial eval statistics and linear layers that give logits
    of order 1, so that a wrong fold or op shows at the tolerance."""
    torch.manual_seed(0)
    model = vhist.create_model(name, num_classes=10, image_size=32, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, torch.nn.Linear):  # the papers' std 0.01 leaves logits near 0 at these widths
                m.weight.normal_(0, 3.0 / m.in_features ** 0.5)
    return model.eval()


def _reference(model, x):
    with vhist.use_backend("torch"), torch.no_grad():
        return model(x)


ONNX_CASES = [
    # (model, kwargs): a CNN of each main op pattern, and a ViT; ResNet-50 (fused conv+BN
    # residuals) in test_pretrained.py's fine-tune + export test
    ("mobilenet_v1", dict(alpha=0.25)),                          # depthwise conv + BN
    ("vgg11_bn", dict(channel_divisor=16)),                      # biased conv before BN (deferred pairs)
    ("inception_v4", dict(channel_divisor=16, num_blocks=(1, 1, 1))),  # branches, asymmetric kernels
    ("vit_tiny_patch16", dict(channel_divisor=8, depth=2)),      # patch conv, attention, LayerNorm
]


@pytest.mark.parametrize(("name", "kwargs"), ONNX_CASES, ids=[c[0] for c in ONNX_CASES])
def test_onnx_export_runs_in_onnxruntime(tmp_path, name, kwargs):
    pytest.importorskip("onnxruntime")  # the dev extra installs it
    import onnx

    model = _model(name, **kwargs)
    done = export_model(model, "onnx", tmp_path / "m.onnx", batch=2, image_size=32, dynamic_batch=True)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), "only standard ONNX ops"
    assert done["bn_left"] == 0
    assert done["bn_folded"] == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for batch in (1, 3):  # another batch than the traced one: the batch dimension is dynamic
        x = torch.randn(batch, 3, 32, 32)
        expected = _reference(model, x)
        assert expected.abs().max() > 0.1  # logits of order 1: the comparison can fail
        assert_close(run_onnx(tmp_path / "m.onnx", x), expected, atol=1e-4, rtol=1e-4, name=name)


def test_exported_program_round_trip(tmp_path):
    """Saved with torch.export.save, loaded in a process that needs no vhist op (the graph
    holds ATen ops only), run at the traced batch."""
    model = _model("alexnet", channel_divisor=16)  # LRN, grouped convs, ReLU epilogues
    done = export_model(model, "exported-program", tmp_path / "m.pt2", batch=2, image_size=32)
    program = torch.export.load(str(tmp_path / "m.pt2"))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert all(t.startswith("aten.") for t in targets), targets
    x = torch.randn(2, 3, 32, 32)
    assert_close(program.module()(x), _reference(model, x), atol=1e-4, rtol=1e-4)
    assert done["checked_batches"] == [2] and done["max_abs_diff"] < 1e-4


def test_failed_check_removes_the_file(tmp_path, monkeypatch):
    import vhist.export as export

    model = _model("resnet18", channel_divisor=16)
    monkeypatch.setattr(export, "reference_logits", lambda m, x: m(x) + 1e-3)  # vhist's logits, shifted
    with pytest.raises(ValueError, match="logits differ from vhist's by up to 1.0..e-03"):
        export_model(model, "exported-program", tmp_path / "m.pt2", batch=1, image_size=32)
    assert not (tmp_path / "m.pt2").exists()


def test_bn_fold_in_graph():
    model = _model("resnet18", channel_divisor=16)
    program, (folded, left) = trace_eval_model(model, 1, 32)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert (folded, left) == (20, 0) and not any("batch_norm" in t for t in targets)
    assert targets.count("aten.conv2d.default") == 20


def test_export_cli_bad_input(tmp_path, capsys):
    def run(*args):
        rc = main(["export", *args])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        return err

    assert "does not exist" in run("--checkpoint", str(tmp_path / "nope.pt"), "--format", "onnx")
    assert "unknown export format 'tflite'; choose from onnx, exported-program" in run(
        "--checkpoint", str(tmp_path / "nope.pt"), "--format", "tflite")
    torch.save({"model": {}}, tmp_path / "weights.pt")
    assert "not a vhist training checkpoint" in run("--checkpoint", str(tmp_path / "weights.pt"), "--format", "onnx")
    with pytest.raises(ValueError, match="--batch must be >= 1"):
        export_model(_model("resnet18", channel_divisor=16), "onnx", tmp_path / "x.onnx", batch=0, image_size=32)
