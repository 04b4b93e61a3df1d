"""``vhist report`` on runs made here (CPU, torch backend, one epoch): the Markdown table's
rows and values, the skipped runs, and PNGs that are written and not blank."""
import json

import numpy as np
import pytest
import torch

import vhist
from vhist.__main__ import main, model_stats
from vhist.report import FAMILY_YEARS, HEADER, LABELS, model_year

COMMON = ["--lr", "0.05", "--warmup-epochs", "0", "--batch-size", "8", "--workers", "0", "--backend", "torch",
          "--device", "cpu", "--epochs", "1"]
SYNTH = "synthetic:classes=3,size=32,train=24,test=8"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder of four runs: AlexNet on synthetic data (with a flip-TTA result), MobileNet-v1
    on a tiny CIFAR-10 folder, a completed tiny test model and a stopped one."""
    import train_helpers

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    cifar = train_helpers.write_cifar10(root / "data", per_batch=6, n_test=8, classes=3)
    out = root / "runs"
    assert main(["train", "--model", "alexnet", "--data", SYNTH, *COMMON, "--out-dir", str(out / "a"),
                 "--run-name", "alexnet"]) == 0
    assert main(["eval", "--checkpoint", str(out / "a" / "alexnet" / "best.pt"), "--workers", "0", "--backend",
                 "torch", "--device", "cpu", "--tta", "flip"]) == 0
    assert main(["train", "--model", "mobilenet_v1", "--data", cifar, *COMMON, "--out-dir", str(out),
                 "--run-name", "mobilenet"]) == 0
    tiny = ["--model", "tiny_train_net", "--data", "synthetic:classes=3,size=8,train=24,test=8", *COMMON,
            "--out-dir", str(out / "b" / "c")]
    assert main(["train", *tiny, "--run-name", "tiny"]) == 0
    assert main(["train", *tiny[:-4], "--epochs", "2", "--stop-after-epochs", "1", "--out-dir", str(out),
                 "--run-name", "stopped"]) == 0
    torch.set_num_threads(threads)
    return out


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def test_report_table_rows_and_values(runs, tmp_path, capsys):
    capsys.readouterr()
    assert main(["report", str(runs), "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    table = (tmp_path / "results.md").read_text()
    assert out == table
    lines = table.splitlines()
    assert lines[0] == "| " + " | ".join(HEADER) + " |" and len(lines) == 2 + 3
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]
    assert [r[0] for r in rows] == ["MobileNet-v1", "AlexNet (synthetic)", "tiny_train_net (synthetic)"]
    mobile, alex = _summary(runs / "mobilenet"), _summary(runs / "a" / "alexnet")
    assert rows[0][1] == "cifar10, 32 px" and rows[1][1] == "synthetic, 32 px" and rows[2][1] == "synthetic, 8 px"
    assert rows[0][2] == "modern (batch_size=8, epochs=1, lr=0.05, warmup_epochs=0)"
    assert rows[0][3] == "1" and rows[0][4] == mobile["device"] and rows[0][4].startswith("CPU")
    assert rows[0][5:8] == [f"{mobile[k]:.2f}" for k in ("best_val_top1", "test_top1", "test_top5")]
    assert rows[0][8] == "–"  # no TTA evaluation of this run
    assert rows[1][8] == f"flip {alex['test_tta']['flip']['top1']:.2f}"
    assert rows[1][6] == f"{alex['test_top1']:.2f}"
    assert rows[0][9] == f"{mobile['train_img_per_s']:,.0f} (torch)"
    assert "skipped" in err and "stopped" in err and "status 'stopped'" in err
    data = json.loads((tmp_path / "results.json").read_text())
    assert [d["year"] for d in data] == [2017, 2012, None]
    assert data[1]["params"] == sum(
        p.numel() for p in vhist.create_model("alexnet", num_classes=3, image_size=32).parameters())
    assert data[0]["gmacs"] == pytest.approx(model_stats("mobilenet_v1", 32)["gmacs"]) and data[0]["gmacs"] > 0


def test_report_pngs_are_not_blank(runs, tmp_path):
    import matplotlib.image

    assert main(["report", str(runs / "mobilenet"), str(runs / "a"), "--out", str(tmp_path)]) == 0
    for name in ("accuracy.png", "curves.png"):
        path = tmp_path / name
        assert path.stat().st_size > 10_000
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 600
        assert pixels[..., :3].std() > 0.05  # not a blank canvas
        # both runs are drawn: pixels in the first two colours of the cycle (tab:blue, tab:orange)
        rgb = pixels[..., :3]
        for colour in ((0.122, 0.467, 0.706), (1.0, 0.498, 0.055)):
            assert (np.abs(rgb - np.array(colour)).max(-1) < 0.08).sum() > 50, (name, colour)


def test_exclude_synthetic_and_no_runs(runs, tmp_path, capsys):
    assert main(["report", str(runs), "--out", str(tmp_path), "--exclude-synthetic"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and table[2].startswith("| MobileNet-v1 |")
    assert main(["report", str(runs / "stopped"), "--out", str(tmp_path / "x")]) == 2
    assert "no completed run to report" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_every_zoo_model_has_a_year_and_label():
    for name in vhist.list_models():
        if name.startswith("tiny_"):
            continue
        assert model_year(name) in {y for y, _ in FAMILY_YEARS.values()}, name
        assert name in LABELS, name
    assert model_year("inception_resnet_v2") == 2016 and model_year("inception_v3") == 2015
    assert model_year("resnet50") == 2015 and model_year("vit_small_patch16") == 2020


def test_history_falls_back_to_metrics_csv(tmp_path):
    from vhist.report import read_history
    from vhist.train.metrics import write_metrics

    history = [{"epoch": 1, "lr": 0.1, "train_loss": 2.5, "train_top1": 10.0, "val_loss": None, "val_top1": None},
               {"epoch": 2, "lr": 0.05, "train_loss": 1.5, "train_top1": 40.0, "val_loss": 1.7, "val_top1": 35.5}]
    write_metrics(tmp_path, history)
    assert read_history(tmp_path) == history
    (tmp_path / "metrics.jsonl").unlink()
    assert read_history(tmp_path) == history
    (tmp_path / "metrics.csv").unlink()
    assert read_history(tmp_path) == []
