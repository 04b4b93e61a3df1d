"""The CLI's handling of what a new user meets (issue 11, cases 1-11): one clear error line
and exit code 2 for expected failures, no empty run folders, readable curves, progress
off a terminal, honest resume messages and plain-text help."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vhist.__main__ import main
from vhist.train import checkpoint as ckpt
from vhist.train.checkpoint import CheckpointError
from vhist.train.metrics import curves_figure, plot_curves


REPO = Path(__file__).resolve().parents[1]
DATA = "synthetic:classes=3,size=8,train=40,test=12"
FAST = ["--model", "tiny_train_net", "--data", DATA, "--lr", "0.05", "--warmup-epochs", "0", "--batch-size", "6",
        "--workers", "0", "--backend", "torch", "--device", "cpu", "--epochs", "1"]


@pytest.fixture(autouse=True, scope="module")
def _tiny_models():
    """Registers the tiny test models (tests/train_helpers.py) when these tests run, not
    when they are collected: tests/test_models.py lists exactly the zoo. One intra-op
    thread: the models are tiny, and threads only contend on a shared CI box."""
    import train_helpers  # noqa: F401

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _error_line(capsys, command: str) -> str:
    """The one stderr line of an expected error (no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"vhist {command}: error: "), err
    return err[0]


def _train(tmp_path, *args):
    return main(["train", *FAST, "--out-dir", str(tmp_path / "runs"), *args])


def _run_cli(*args, env_drop=(), env=None, code="from vhist.__main__ import main; sys.exit(main(sys.argv[1:]))"):
    """``vhist ARGS`` in a fresh process (for what depends on the process's start-up)."""
    environ = {k: v for k, v in os.environ.items() if k not in env_drop} | (env or {})
    return subprocess.run([sys.executable, "-c", "import sys; " + code, *args], capture_output=True, text=True,
                          env=environ, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    assert main(["train", *FAST, "--out-dir", str(out), "--run-name", "done"]) == 0
    return out / "done"


# ----------------------------------------------------------------------------- case 1: bad checkpoints


def _bad_checkpoints(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"format": ckpt.FORMAT, "w": torch.zeros(256)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "vhist-train-9"}, newer)
    return {truncated: "truncated or damaged", text: "not a torch checkpoint",
            other: "not a vhist training checkpoint", newer: "format 'vhist-train-9'"}


def test_bad_checkpoint_is_one_clear_line(tmp_path, capsys):
    for path, expected in _bad_checkpoints(tmp_path).items():
        assert main(["eval", "--checkpoint", str(path), "--workers", "0"]) == 2
        assert expected in _error_line(capsys, "eval")
        assert main(["train", "--resume", str(path), "--workers", "0"]) == 2
        line = _error_line(capsys, "train")
        assert expected in line and str(path) in line
    with pytest.raises(CheckpointError, match="truncated"):
        main(["--debug", "eval", "--checkpoint", str(tmp_path / "truncated.pt")])


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("VHIST_DEBUG", "1")
    (tmp_path / "x.pt").write_text("junk")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        main(["eval", "--checkpoint", str(tmp_path / "x.pt")])


# ----------------------------------------------------------------------------- cases 2, 5, 6: arguments


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, capsys):
    assert _train(tmp_path, "--device", "cuda") == 2
    assert "--device cuda: CUDA is not available here" in _error_line(capsys, "train")
    assert not (tmp_path / "runs").exists()
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--device", "cuda"]) == 2
    assert "does not exist" in _error_line(capsys, "eval")  # the checkpoint is checked first


@pytest.mark.parametrize("args, message", [
    (("--lr", "-0.1"), "--lr must be > 0, got -0.1"),
    (("--model", "resnet19"), "unknown model 'resnet19'; did you mean resnet18"),
    (("--device", "tpu"), "--device 'tpu' is not a device"),
    (("--val-fraction", "1.5"), "--val-fraction must be >= 0 and < 1, got 1.5"),
    (("--log-every", "0"), "--log-every must be >= 1, got 0"),
    (("--label-smoothing", "1"), "--label-smoothing must be >= 0 and < 1, got 1"),
])
def test_bad_arguments_name_the_flag_and_leave_no_folder(tmp_path, capsys, args, message):
    assert _train(tmp_path, *args) == 2
    line = _error_line(capsys, "train")
    assert message in line
    if "resnet19" in args:
        assert "`vhist models`" in line and "list_models" not in line
    assert not (tmp_path / "runs").exists()


def test_eval_flag_needs_resume(tmp_path, capsys):
    assert _train(tmp_path, "--eval") == 2
    assert "--eval goes with --resume" in _error_line(capsys, "train")
    assert not (tmp_path / "runs").exists()


def test_unknown_model_pattern_in_vhist_models(capsys):
    assert main(["models", "resnet19"]) == 2
    assert "did you mean resnet18" in _error_line(capsys, "models")


def test_failure_after_start_keeps_folder_with_failed_summary(tmp_path, capsys):
    # The model bypasses its SyncBatchNorm: found at the first step, after the folder exists.
    args = [a if a != "tiny_train_net" else "tiny_direct_fused_net" for a in FAST]
    rc = main(["train", *args, "--out-dir", str(tmp_path), "--run-name", "late", "--sync-bn"])
    assert rc == 2
    assert "did not run their own forward" in _error_line(capsys, "train")
    summary = json.loads((tmp_path / "late" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 2
    assert "did not run their own forward" in summary["message"] and summary["epochs_done"] == 0
    assert (tmp_path / "late" / "config.json").is_file()


def test_a_bug_keeps_its_traceback_and_is_recorded(tmp_path, monkeypatch):
    import vhist.train.engine as engine

    def broken(*args):
        raise TypeError("a bug in the metrics writer")

    monkeypatch.setattr(engine, "write_metrics", broken)
    with pytest.raises(TypeError, match="a bug in the metrics writer"):
        _train(tmp_path, "--run-name", "bug")
    summary = json.loads((tmp_path / "runs" / "bug" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 1
    assert summary["message"] == "TypeError: a bug in the metrics writer"


# ----------------------------------------------------------------------------- cases 3, 4, 7: backends


def test_backend_triton_on_cpu_without_interpreter(tmp_path):
    out = tmp_path / "runs"
    r = _run_cli("train", "--model", "resnet18", "--data", DATA, "--backend", "triton", "--device", "cpu",
                 "--out-dir", str(out), env_drop=("TRITON_INTERPRET",))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vhist train: error: --backend triton on a CPU device"), lines
    assert "TRITON_INTERPRET=1" in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()


def test_bad_backend_env_in_info(monkeypatch, capsys):
    monkeypatch.setenv("VHIST_BACKEND", "nope")
    assert main(["info"]) == 2
    captured = capsys.readouterr()
    info = json.loads(captured.out)
    assert "'nope'" in info["error"] and info["backend"] is None and info["source"] == "$VHIST_BACKEND"
    assert captured.err.strip() == ("vhist info: error: unknown vhist backend 'nope' (from $VHIST_BACKEND); "
                                    "valid backends: triton, cuda, torch")


def test_interpreter_set_after_import_is_reported_and_refused():
    script = """
import os, torch, vhist
os.environ["TRITON_INTERPRET"] = "1"
print(vhist.backend_info()["triton_interpret"])
try:
    with vhist.use_backend("triton"):
        vhist.nn.BatchNorm2d(3)(torch.randn(2, 3, 4, 4))
except vhist.backend.BackendUnavailable as exc:
    print("refused:", exc)
"""
    r = _run_cli(code=script, env_drop=("TRITON_INTERPRET",))
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().splitlines()
    assert first == "False"
    assert second.startswith("refused: vhist op 'batch_norm'") and "set before triton and vhist" in second


# ----------------------------------------------------------------------------- case 8: curves


def _spiky_history():
    val = [2.1, 1.7, 3.9e6, 1.4, 1.2]
    return [{"epoch": e + 1, "train_loss": 2.3 - 0.2 * e, "train_top1": 20.0 + 10 * e, "val_loss": v,
             "val_top1": 25.0 + 8 * e} for e, v in enumerate(val)]


def test_curves_readable_with_a_loss_spike(tmp_path):
    import math

    history = _spiky_history()
    fig = curves_figure(history)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "log" in ax.get_ylabel()
    low, high = ax.get_ylim()
    train_line, val_line = ax.get_lines()[:2]
    assert [line.get_label() for line in ax.get_lines()[:2]] == ["train", "validation"]
    # every train point and every validation point but the spike lie inside the axis
    assert low <= min(train_line.get_ydata()) and max(train_line.get_ydata()) <= high
    assert sum(low <= v <= high for v in val_line.get_ydata()) == 4
    # the spike is clipped and marked with its value
    assert "clipped" in ax.get_title() and [t.get_text() for t in ax.texts] == ["3.9e+06"]
    # the train curve spans a readable part of the height (> 10%), not a flat line
    span = math.log10(max(train_line.get_ydata()) / min(train_line.get_ydata())) / math.log10(high / low)
    assert span > 0.1
    # without a spike nothing is clipped
    calm = [dict(r, val_loss=1.5) for r in history]
    assert "clipped" not in curves_figure(calm).axes[0].get_title()
    plot_curves(history, tmp_path / "curves.png")
    from PIL import Image

    with Image.open(tmp_path / "curves.png") as im:
        assert im.size == (1000, 400)


# ----------------------------------------------------------------------------- case 9: progress off a terminal


def test_progress_lines_off_a_terminal(tmp_path, capsys, monkeypatch):
    assert _train(tmp_path, "--log-every", "2", "--run-name", "steps") == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch 1/1 step")]
    # 40 synthetic images, 4 held out, batch 6: 6 steps; lines after steps 1, 2, 4 and 6
    assert [line.split(":")[0] for line in lines] == [f"epoch 1/1 step {s}/6" for s in (1, 2, 4, 6)]
    assert all(" loss " in line and " img/s " in line and "ETA" in line for line in lines)

    import vhist.train.metrics as metrics

    monkeypatch.setattr(metrics, "PROGRESS_SECONDS", 0.0)  # the time rule: a line at every step
    assert _train(tmp_path, "--log-every", "100", "--run-name", "timed") == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("epoch 1/1 step") for line in out.splitlines()) == 6


# ----------------------------------------------------------------------------- case 10: schedule, resume, data line


def test_warmup_not_shorter_than_run_warns(tmp_path, capsys):
    args = [a for a in FAST]
    args[args.index("--warmup-epochs") + 1] = "5"
    assert main(["train", *args, "--out-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "warning: the warm-up (5 epochs) is not shorter than the run (1 epochs)" in err


def test_resume_of_finished_run_says_complete(finished_run, capsys):
    capsys.readouterr()
    before = (finished_run / "summary.json").read_text()
    stamp = (finished_run / "last.pt").stat().st_mtime_ns
    assert main(["train", "--resume", str(finished_run / "last.pt"), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"run {finished_run} is already complete (1/1 epochs" in out and "add --eval" in out
    assert "resuming from" not in out and "epoch 1/1:" not in out
    assert (finished_run / "summary.json").read_text() == before
    assert (finished_run / "last.pt").stat().st_mtime_ns == stamp

    assert main(["train", "--resume", str(finished_run / "last.pt"), "--workers", "0", "--backend", "torch",
                 "--eval"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["top1"] == pytest.approx(json.loads(before)["test_top1"]) and result["count"] == 12


def test_data_line_printed(tmp_path, capsys):
    assert _train(tmp_path, "--run-name", "line") == 0
    out = capsys.readouterr().out
    assert "synthetic synthetic" not in out
    assert "data: synthetic images (classes=3,size=8,train=40,test=12): 36 train / 4 validation / 12 test" in out


# ----------------------------------------------------------------------------- case 11: plain-text help


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["models"], ["info"]])
def test_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: vhist" in out and "--debug" in out
    for markup in ("``", ":func:", ":class:", ":mod:"):
        assert markup not in out, markup
