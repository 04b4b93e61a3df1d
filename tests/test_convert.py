"""vhist.convert and the torch.compile backend "vhist" on the blocks of torchvision and
timm, written in plain PyTorch (tests/convert_blocks.py): the report's coverage, logits
and every gradient against the unconverted model (float64, torch backend and Triton's
interpreter), running statistics after three training steps, eval outputs, the
state_dict, idempotence, BatchNorm's module semantics, the compile backend, the CLI."""
import argparse
import copy
import linecache

import pytest
import torch
from torch import nn

import vhist
from vhist.convert import calls
from vhist.convert.calls import has_layer_orders
from vhist.ops.common import ACTIVATION_CODES
from convert_blocks import BLOCKS, Bottleneck, Conv2dSame, ConvNormAct, classifier, expected_label

NAMES = list(BLOCKS)
DEFERRED = " (BN+act in the next conv's prologue)"
# Convs whose BN + activation run in the consuming convs' prologue (their output feeds
# only dense fused conv + BN ops).
DEFERRED_CONVS = {"resnet_bottleneck": {"0.conv1", "0.conv2"}, "split_pair": {"0.0.conv"},
                  "csp_leaky_relu": {"0.blocks.0.conv1.conv"}}
# Convs whose input's BN + activation (on a concatenation) run in their prologue.
PROLOGUE_INPUTS = {"densenet_layer": {"0.denselayer1.conv1", "0.denselayer2.conv1"}}


def test_kernels_have_every_activation_and_layer_order_the_blocks_use():
    """The coverage below is the full one: every activation of the blocks and both layer
    orders are vhist's (a kernel table that loses one fails here, not silently there)."""
    used = {step.split("(")[0] for _, _, steps in BLOCKS.values() for chain in steps.values() for step in chain}
    assert used - {"BN", "residual"} <= set(ACTIVATION_CODES)
    assert has_layer_orders()
TIGHT = dict(rtol=1e-9, atol=1e-12)  # float64: the converted ops compute the same sums


def _pair(name):
    build, shape, steps = BLOCKS[name]
    torch.manual_seed(0)
    model = build().double()
    for m in model.modules():  # non-trivial statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    converted = vhist.convert(model)
    return model, converted, shape, steps


def _inputs(shape, count, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(count)]


def _compare_step(model, converted, x, opts=None):
    """One training forward + backward of both; logits and every gradient compared."""
    for net in (model, converted):
        net.zero_grad(set_to_none=True)
    out, ref = converted(x), model(x)
    torch.testing.assert_close(out, ref, **TIGHT)
    (ref * torch.arange(ref.numel(), dtype=ref.dtype).view_as(ref)).sum().backward()
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    for (name, p), q in zip(model.named_parameters(), converted.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, **TIGHT, msg=lambda m, n=name: f"grad of {n}: {m}")
    if opts:
        for opt in opts:
            opt.step()


def _compare_state(model, converted):
    ref, got = model.state_dict(), converted.state_dict()
    assert list(got) == list(ref)
    for key in ref:
        assert got[key].shape == ref[key].shape, key
        torch.testing.assert_close(got[key], ref[key], **TIGHT, msg=lambda m, k=key: f"{k}: {m}")


def _forward_sources(model):
    """The code of every forward the conversion wrote (instance attributes)."""
    out = {}
    for name, m in model.named_modules():
        fn = m.__dict__.get("forward")
        if fn is not None:
            code = fn.__func__.__code__
            out[name] = "".join(linecache.getlines(code.co_filename))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_convert_report_coverage(name):
    model, _, shape, steps = _pair(name)
    _, report = vhist.convert.convert_with_report(model, input_size=shape[1:])
    records = {r.name: r for r in report.convs}
    assert set(records) == set(steps)
    for conv, chain in steps.items():
        fused, missing = expected_label(chain)
        assert records[conv].on_vhist, conv
        if (name, conv) == ("data_dependent", "0.a.conv"):
            assert records[conv].macs is None  # the branch a zero image does not take: not counted
        else:
            assert records[conv].macs > 0, conv
        assert missing is None and records[conv].fused.removesuffix(DEFERRED) == fused, (conv, records[conv])
    assert {r.name for r in report.convs if r.fused.endswith(DEFERRED)} == DEFERRED_CONVS.get(name, set())
    assert {r.name for r in report.convs if any("runs in its prologue" in n for n in r.notes)} == \
        PROLOGUE_INPUTS.get(name, set())
    assert report.share == 1.0
    assert report.macs == sum(r.macs or 0 for r in report.convs) > 0
    assert bool(report.untraced) == (name == "data_dependent")


@pytest.mark.parametrize("name", NAMES)
def test_convert_block_torch_backend(name):
    model, converted, shape, _ = _pair(name)
    _compare_state(model, converted)
    converted.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(converted.state_dict(), strict=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, converted)]
    for x in _inputs(shape, 3):
        _compare_step(model, converted, x, opts)
    _compare_state(model, converted)  # running statistics, num_batches_tracked, updated weights
    model.eval()
    converted.eval()
    x = _inputs(shape, 1, seed=2)[0]
    torch.testing.assert_close(converted(x), model(x), **TIGHT)
    # Idempotence: converting again writes the same code and computes the same.
    again = vhist.convert(converted)
    assert _forward_sources(again).keys() == _forward_sources(converted).keys()
    strip = lambda src: src.split("\n", 1)[1]  # noqa: E731
    assert [strip(s) for s in _forward_sources(again).values()] == [
        strip(s) for s in _forward_sources(converted).values()]
    torch.testing.assert_close(again(x), model(x), **TIGHT)


@pytest.mark.parametrize("name", NAMES)
def test_convert_block_triton_interpreter(name, monkeypatch):
    model, converted, shape, _ = _pair(name)
    x = _inputs(shape, 1)[0]
    handed = []
    apply = vhist.ops.ConvBNStatsFunction.apply
    monkeypatch.setattr(vhist.ops.ConvBNStatsFunction, "apply",
                        lambda *args: handed.append(args[3] is not None) or apply(*args))
    with vhist.use_backend("triton"):
        _compare_step(model, converted, x)
        # The deferred BN + acts ran in their consumers' prologues (pre_mean given).
        assert sum(handed) == len(DEFERRED_CONVS.get(name, ())) + len(PROLOGUE_INPUTS.get(name, ()))
        _compare_state(model, converted)
        model.eval()
        converted.eval()
        torch.testing.assert_close(converted(x), model(x), **TIGHT)


def _compare_compiled(model, backend, x):
    """A training step of ``torch.compile(copy of model, backend=backend)`` against the
    eager model: logits, every gradient, running statistics."""
    compiled_model = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend=backend)
    out, ref = compiled(x), model(x)
    torch.testing.assert_close(out, ref, **TIGHT)
    out.sum().backward()
    ref.sum().backward()
    for p, q in zip(model.parameters(), compiled_model.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, **TIGHT)
    _compare_state(model, compiled_model)


@pytest.mark.parametrize("name", NAMES)
def test_compile_backend_rewrites_each_graph(name):
    """torch.compile with vhist's backend (the rewritten graphs run through AOTAutograd
    without Inductor's code generation, which the next test covers)."""
    build, shape, steps = BLOCKS[name]
    torch.manual_seed(0)
    model = build().double()
    graphs = []

    def spy(gm, example_inputs):
        out = vhist.convert.backend(gm, example_inputs, inner="aot_eager")
        graphs.append(gm)
        return out

    _compare_compiled(model, spy, _inputs(shape, 1)[0])
    vhist_calls = [n for g in graphs for n in g.graph.nodes if n.op == "call_function" and n.target in calls.CALLS]
    # Every conv that ran is a vhist call (data_dependent runs one of its two branches).
    assert len(vhist_calls) == len(steps) - (name == "data_dependent")
    assert len(graphs) >= (2 if name == "data_dependent" else 1)


def test_compile_backend_vhist_entry_point():
    """torch.compile(model, backend="vhist"): found through the entry point, Inductor after
    the rewrite; logits, gradients and running statistics as eager."""
    from torch._dynamo.backends.registry import list_backends

    assert "vhist" in list_backends(exclude_tags=())
    model, _, shape, _ = _pair("resnet_bottleneck")
    _compare_compiled(model, "vhist", _inputs(shape, 1)[0])


def _conv_bn_relu(**bn_kwargs):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, **bn_kwargs), nn.ReLU())


@pytest.mark.parametrize("bn_kwargs", [
    dict(momentum=None),                # cumulative average
    dict(track_running_stats=False),    # batch statistics in eval too
    dict(affine=False),
    dict(momentum=0.3, eps=1e-3),
])
def test_convert_batch_norm_semantics(bn_kwargs):
    torch.manual_seed(0)
    model = _conv_bn_relu(**bn_kwargs).double()
    converted = vhist.convert(model)
    _, report = vhist.convert.convert_with_report(model)
    assert report.convs[0].fused == "BN+relu"
    xs = _inputs((2, 3, 5, 5), 4)
    for x in xs[:3]:
        _compare_step(model, converted, x)
    _compare_state(model, converted)
    for m in (model, converted):
        m.eval()
    torch.testing.assert_close(converted(xs[3]), model(xs[3]), **TIGHT)
    model.train()
    converted.train()  # and back to training: batch statistics again
    _compare_step(model, converted, xs[3])
    _compare_state(model, converted)


@pytest.mark.parametrize("sync", ["vhist", "torch"])
def test_convert_sync_batch_norm_stays_synchronized(sync):
    torch.manual_seed(0)
    model = _conv_bn_relu().double()
    model = vhist.nn.convert_sync_batchnorm(model) if sync == "vhist" else nn.SyncBatchNorm.convert_sync_batchnorm(model)
    converted = vhist.convert(model)
    calls_seen = []
    converted[1].register_forward_hook(lambda *_: calls_seen.append(1))  # the module's own forward runs
    for x in _inputs((2, 3, 5, 5), 2):
        _compare_step(model, converted, x)
    _compare_state(model, converted)
    assert len(calls_seen) == 2
    _, report = vhist.convert.convert_with_report(model)
    assert report.convs[0].on_vhist and report.convs[0].fused == "BN"
    assert "SyncBatchNorm runs unfused" in report.convs[0].notes[0]


def test_convert_changes_only_the_model():
    torch.manual_seed(0)
    class_forwards = (Bottleneck.forward, nn.Sequential.forward, nn.Conv2d.forward, nn.BatchNorm2d.forward)
    torch_functions = (torch.nn.functional.conv2d, torch.nn.functional.batch_norm, torch.nn.functional.relu)
    model = classifier(Bottleneck(8, 2), 8)
    other = classifier(Bottleneck(8, 2), 8)
    converted = vhist.convert(model)
    assert converted is not model and type(converted) is type(model)
    assert "forward" not in model.__dict__ and "forward" in converted.__dict__
    assert not any("forward" in m.__dict__ for m in other.modules())
    assert (Bottleneck.forward, nn.Sequential.forward, nn.Conv2d.forward, nn.BatchNorm2d.forward) == class_forwards
    assert (torch.nn.functional.conv2d, torch.nn.functional.batch_norm, torch.nn.functional.relu) == torch_functions
    assert not any(isinstance(m, vhist.nn.BatchNorm2d) for m in converted.modules())  # no module swapped
    same = vhist.convert(model, inplace=True)
    assert same is model and "forward" in model.__dict__


def test_convert_report_prints(capsys):
    model = classifier(ConvNormAct(3, 4, 3), 4)
    vhist.convert(model, report=True, input_size=8)
    out = capsys.readouterr().out
    assert "0.conv" in out and "conv+BN+relu" in out
    # 3x3 conv, 3 -> 4 channels at 8x8: 8 * 8 * 4 * 27 multiply-adds, all on vhist.
    assert "conv multiply-adds on vhist at input 3x8x8: 100.0% (0.01 of 0.01 MMACs; 1 convs, 1 on vhist)" in out


def test_convert_reports_an_activation_the_kernels_lack(monkeypatch):
    """An activation missing from the kernels' table stays PyTorch's; the report says so."""
    monkeypatch.delitem(ACTIVATION_CODES, "silu")
    model, converted, shape, _ = _pair("mbconv_silu_se")
    _, report = vhist.convert.convert_with_report(model, input_size=shape[1:])
    records = {r.name: r for r in report.convs}
    assert records["0.block.0.0"].fused == "BN" and records["0.block.2.fc1"].fused == ""
    assert "activation silu unsupported by vhist's kernels (runs as PyTorch's)" in records["0.block.0.0"].notes
    assert report.share == 1.0  # the convs still run on vhist
    for x in _inputs(shape, 2):
        _compare_step(model, converted, x)


def test_convert_never_raises_on_unsupported_parts():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)).tanh() + self.conv(x).flip(-1)

    model = Odd().double()
    converted, report = vhist.convert.convert_with_report(model, input_size=6)
    assert [r.on_vhist for r in report.convs] == [False, False]
    assert "padding_mode='reflect'" in report.convs[0].notes[0]
    x = _inputs((2, 3, 6, 6), 1)[0]
    torch.testing.assert_close(converted(x), model(x), **TIGHT)


def test_dynamic_same_padding_conv_is_reported_and_compiles():
    """timm's Conv2dSame computes its padding from the input size (math.ceil): torch.fx cannot
    trace it, so the report lists it as PyTorch's with its multiply-adds; Dynamo traces it,
    so the compile backend runs it on vhist."""
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1)).double()
    converted, report = vhist.convert.convert_with_report(model, input_size=7)
    same, pointwise = report.convs
    assert (same.name, same.on_vhist, same.macs) == ("0", False, 4 * 4 * 4 * 27)
    assert "does not trace" in same.notes[0] and pointwise.on_vhist
    assert report.share == pytest.approx(16 * 4 * 4 / (16 * 4 * 4 + 4 * 4 * 4 * 27))
    graphs = []

    def spy(gm, example_inputs):
        graphs.append(gm)
        return vhist.convert.backend(gm, example_inputs, inner="aot_eager")

    torch._dynamo.reset()
    x = _inputs((2, 3, 7, 7), 1)[0]
    compiled_model = copy.deepcopy(model)
    torch.testing.assert_close(torch.compile(compiled_model, backend=spy)(x), model(x), **TIGHT)
    assert [n.target for g in graphs for n in g.graph.nodes if n.target in calls.CALLS] == [calls.conv_bn, calls.conv]


@pytest.mark.parametrize("spec,package", [("torchvision:resnet18", "torchvision"), ("timm:resnet18", "timm")])
def test_cli_external_model_without_its_package(spec, package, capsys):
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    from vhist.__main__ import main

    for argv in (["convert", spec], ["train", "--model", spec, "--data", "synthetic"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"needs the package {package}" in err[0], err


def test_cli_train_compile_flag(capsys, tmp_path):
    from vhist.__main__ import main
    from vhist.train.cli import add_train_parser

    commands = argparse.ArgumentParser().add_subparsers()
    args = add_train_parser(commands).parse_args(["--model", "alexnet", "--data", "synthetic", "--compile"])
    assert args.compile is True
    argv = ["train", "--model", "alexnet", "--data", "synthetic", "--compile", "--cuda-graph", "--out-dir",
            str(tmp_path)]
    assert main(argv) == 2
    assert "--compile and --cuda-graph: give one of them" in capsys.readouterr().err


def test_cli_convert_zoo_model(capsys):
    from vhist.__main__ import main

    assert main(["convert", "alexnet", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "features.0" in out and "a vhist.nn model: already on vhist" in out
    assert main(["convert", "no_such_model"]) == 2

