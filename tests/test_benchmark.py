"""``vhist benchmark`` without a GPU: it says so, runs one untimed step per model and
bench on the CPU's torch backend, and writes the results file (rows and metadata)."""
import csv
import json

import pytest
import torch

from vhist.__main__ import main
from vhist.benchmark import git_sha


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path")
def test_benchmark_cpu_smoke_and_results_file(tmp_path, capsys):
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    assert main(["benchmark", "--models", "resnet18,mobilenet_v*", "--bench", "both",
                 "--results-file", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "No CUDA device: nothing is timed" in printed and f"wrote {out_json}" in printed
    result = json.loads(out_json.read_text())
    meta, rows = result["meta"], result["rows"]
    assert meta["device"].startswith("cpu") and meta["torch"] == torch.__version__
    assert meta["git_sha"] == git_sha() and len(meta["git_sha"]) in (40, len("unknown"))
    assert [(r["model"], r["bench"]) for r in rows] == [
        (m, b) for m in ("resnet18", "mobilenet_v1", "mobilenet_v2") for b in ("inference", "train")]
    assert all(r["status"] == "ok (untimed)" and "ms" not in r and r["image_size"] == 32 for r in rows)
    assert main(["benchmark", "--models", "resnet18", "--bench", "inference", "--results-file", str(out_csv)]) == 0
    with open(out_csv) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 1 and table[0]["model"] == "resnet18" and table[0]["device"] == meta["device"]


def test_benchmark_bad_input(capsys):
    for args, message in ((["--models", "resnet_51"], "unknown model 'resnet_51'"),
                          (["--bench", "serve"], "--bench must be one of inference, train, both"),
                          (["--providers", "tensorrt"], "unknown providers ['tensorrt']"),
                          (["--results-file", "r.txt"], "--results-file must end in .json or .csv")):
        assert main(["benchmark", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
