"""scripts/memcheck.py (the GPU run's memcheck part) with stand-in compute-sanitizer
executables: the probe that reports the sanitizer unavailable, memcheck's error count,
and the clean run (the ops run on the CPU here, through the interpreter)."""
import importlib.util
import json
import os
import stat

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("memcheck", os.path.join(ROOT, "scripts", "memcheck.py"))
memcheck = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memcheck)

# A stand-in sanitizer: `compute-sanitizer --tool memcheck --error-exitcode 3 [--print-limit N] CMD...`.
FAKE = """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift 2; done
{body}
"""
PROBE_REFUSED = 'echo "========= Error: Target application terminated before first instrumented API call"; exit 1'
RUNS_CLEAN = '"$@"; code=$?; echo "========= ERROR SUMMARY: 0 errors"; exit $code'
FINDS_ERRORS = ('case "$*" in *--ops*) echo "========= Invalid __global__ read of size 4 bytes"; '
                'echo "========= ERROR SUMMARY: 2 errors"; exit 3;; esac; "$@"')


def _fake(tmp_path, body):
    path = tmp_path / "compute-sanitizer"
    path.write_text(FAKE.format(body=body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture
def on_gpu(monkeypatch):
    """The probe's GPU check passes; the probe command itself runs on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memcheck, "PROBE", "print('probe', float((__import__('torch').ones(64) + 1).sum()))")


def test_unavailable_reasons(tmp_path, on_gpu):
    assert memcheck.sanitizer_unavailable(None, 10).startswith("compute-sanitizer not found")
    reason = memcheck.sanitizer_unavailable(_fake(tmp_path, PROBE_REFUSED), 10)
    assert "exited 1" in reason and "first instrumented API call" in reason
    assert memcheck.sanitizer_unavailable(_fake(tmp_path, RUNS_CLEAN), 60) is None


def test_errors_fail_the_part(tmp_path, on_gpu, monkeypatch):
    monkeypatch.setattr(memcheck, "find_sanitizer", lambda: _fake(tmp_path, FINDS_ERRORS))
    assert memcheck.main(["--out", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "memcheck.json").read_text())
    assert result["status"] == "errors" and result["errors"] == 2 and result["sanitizer"] == "available"


def test_clean_run_under_the_sanitizer(tmp_path, on_gpu, monkeypatch):
    monkeypatch.setattr(memcheck, "find_sanitizer", lambda: _fake(tmp_path, RUNS_CLEAN))
    assert memcheck.main(["--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "memcheck.json").read_text())
    assert result["status"] == "clean" and result["errors"] == 0 and result["exit_code"] == 0, result
    assert len(result["ops"]) == 5


def test_error_count_parsing():
    assert memcheck.error_count("========= ERROR SUMMARY: 0 errors\n") == 0
    assert memcheck.error_count("x\n========= ERROR SUMMARY: 1 error\n") == 1
    assert memcheck.error_count("no summary") is None
