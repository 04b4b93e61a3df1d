"""bench/conv_model.py: the static model's factors on a hand-worked layer, and its CLI."""
import importlib
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _model():
    if BENCH not in sys.path:
        sys.path.append(BENCH)
    return importlib.import_module("conv_model")


H100 = dict(hbm_gbps=3350, bf16_tflops=989)
CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_stages": 3}


def test_conv_model_layer4_by_hand():
    """ResNet-50 layer4.conv2 (512 -> 512, 3x3, 7x7, batch 128) on 128x128x32 s3, one
    block per SM: M = 6272 = 49 tiles exactly, 4 N tiles, 196 programs in 2 waves of 132,
    144 K steps, compute-bound."""
    model = _model()
    gemm = model.layer_gemm(512, 512, (3, 3), 1, 1, (7, 7))
    assert gemm[:4] == (6272, 512, 9, 512)
    out = model.predict(gemm, CONFIG, 1, H100)
    assert out["tile"] == 1.0
    assert out["waves"] == pytest.approx(196 / 264)
    assert out["fill"] == pytest.approx(144 / 146)
    assert out["smem"] == 1.0 and not out["hbm_bound"]
    assert out["fraction_of_peak"] == pytest.approx(196 / 264 * 144 / 146)


def test_conv_model_stem_counts_padded_channels_and_small_tiles_hit_shared_memory():
    model = _model()
    gemm = model.layer_gemm(3, 64, (7, 7), 2, 3, (224, 224))
    assert gemm[:4] == (128 * 112 * 112, 64, 49, 16)
    out = model.predict(gemm, {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "num_stages": 3}, 4, H100)
    assert out["tile"] == pytest.approx(3 / 16)  # 3 of 16 channels per K block are real
    assert out["smem"] == pytest.approx(64 * 32 * 128 / (2 * 96 * 2048))


def test_conv_model_cli(tmp_path, capsys):
    row = {"kernel": "_conv2d_fwd_kernel", "mode": "eval fwd", "dtype": "bf16", "layer": "layer4.conv2",
           "config": "BLOCK_K=32,BLOCK_M=128,BLOCK_N=128 w8 s3", "blocks_per_sm": 1, **CONFIG}
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"meta": {"git_sha": "0" * 40}, "rows": [row]}))
    out = tmp_path / "model.json"
    assert _model().main(["--report", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("MODEL (not measured)") and "layer4.conv2" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["layer"] for r in rows] == ["layer4.conv2"]
    assert rows[0]["fraction_of_peak"] == pytest.approx(196 / 264 * 144 / 146, rel=1e-6)
