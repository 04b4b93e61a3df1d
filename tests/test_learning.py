"""End-to-end learning on real data: scikit-learn's digits (`vhist data make digits`),
torch backend, CPU, AlexNet under its Imagenette recipe and its seed recipe as defined,
with 5 epochs at batch 64 (the command of issue 26), of which CI trains the first 2
(``--stop-after-epochs 2``: the schedule is the 5-epoch run's), then evaluates the weights
on the test split. Unlike the other training tests it keeps torch's intra-op threads (all
cores): AlexNet at 32 px is the cost of this test.

A run "leaves chance" when the validation top-1 of its raw or EMA weights reaches 20%,
twice the 10% of a guess on the 10 balanced classes (143 validation images: chance's
standard deviation is 2.5 points); its test top-1 must be at least 20% too. Measured
(bench/NOTES.md, issue 26): ``imagenette-alexnet`` 25.2% validation top-1 after 2 epochs
(modern init), ``seed-alexnet`` 33.6% (PyTorch's default init); under the paper's
N(0, 0.01) initialization, which every AlexNet had before these recipes named an init,
AlexNet stays at chance for 11 (``seed-alexnet``) or more than 15 (``imagenette-alexnet``)
epochs, and this test fails.
"""
import json

import pytest

from vhist.__main__ import main

LEFT_CHANCE = 20.0
CASES = [("alexnet", "imagenette-alexnet"), ("alexnet", "seed-alexnet")]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from vhist.train.digits import make_digits

    return make_digits(tmp_path_factory.mktemp("digits"))["path"]


@pytest.mark.parametrize("model,recipe", CASES, ids=[c[1] for c in CASES])
def test_recipe_leaves_chance_within_two_epochs(digits, tmp_path, capsys, model, recipe):
    rc = main(["train", "--model", model, "--recipe", recipe, "--data", digits, "--epochs", "5",
               "--batch-size", "64", "--stop-after-epochs", "2", "--backend", "torch", "--device", "cpu",
               "--workers", "0", "--out-dir", str(tmp_path), "--run-name", recipe])
    assert rc == 0
    run = tmp_path / recipe
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    val = [max(r["val_top1"], r.get("ema_val_top1", 0.0)) for r in rows]
    assert max(val) >= LEFT_CHANCE, f"{model} under {recipe} still at chance after 2 epochs: {val}"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--backend", "torch", "--workers", "0",
                 "--device", "cpu"]) == 0
    test = json.loads(capsys.readouterr().out)
    assert test["top1"] >= LEFT_CHANCE, f"{model} under {recipe}: test top-1 {test['top1']:.1f}% after 2 epochs"
