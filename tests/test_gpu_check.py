"""`make gpu-check` on a machine without what it needs: one line naming it, nothing written."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_check
from tests.conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_make_gpu_check_without_cuda_names_it_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu-check"
    result = subprocess.run(
        ["make", "-s", "gpu-check", f"PYTHON={sys.executable}", f"GPU_CHECK_OUT={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("gpu-check:")]
    assert len(errors) == 1 and "no CUDA device" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_gpu_check_without_dali_names_it(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name.startswith("nvidia.dali") else real_find_spec(name, *args)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    out = tmp_path / "gpu-check"
    assert gpu_check.main(["--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no DALI" in err[0] and "nvidia-dali" in err[0]
    assert not out.exists()


def test_gpu_check_refuses_a_non_empty_out(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check, "require_gpu_stack", lambda: {"gpu": "stand-in"})
    out = tmp_path / "gpu-check"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert gpu_check.main(["--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == "{}"


def test_gpu_check_runs_every_step_and_summarises(monkeypatch, tmp_path):
    """The orchestration without a GPU: real synth and build, stand-in GPU steps."""
    monkeypatch.setattr(gpu_check, "require_gpu_stack", lambda: {"gpu": "stand-in"})
    ok, failing = [sys.executable, "-c", "print('fine')"], [sys.executable, "-c", "exit(3)"]
    monkeypatch.setattr(
        gpu_check, "steps", lambda out, data, py, quick: [("ok", ok, 30), ("fails", failing, 30)]
    )
    out = tmp_path / "gpu-check"
    assert gpu_check.main(["--out", str(out), "--samples", "128"]) == 1  # one step failed
    summary = json.loads((out / "summary.json").read_text())
    assert {k: v["rc"] for k, v in summary["steps"].items()} == {
        "synth": 0,
        "build": 0,
        "ok": 0,
        "fails": 3,
    }
    manifest = json.loads((out / "work" / "shards" / "manifest.json").read_text())
    assert 100 <= sum(split["samples"] for split in manifest["splits"].values()) <= 200
    assert (out / "ok.log").read_text().strip() == "fine"


def test_overwrite_replaces_only_what_gpu_check_wrote(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "require_gpu_stack", lambda: {"gpu": "stand-in"})
    ok = [sys.executable, "-c", "print('fine')"]
    monkeypatch.setattr(gpu_check, "steps", lambda out, data, py, quick: [("ok", ok, 30)])
    out = tmp_path / "gpu-check"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier run's
    (out / "notes.txt").write_text("the user's file")
    assert gpu_check.main(["--out", str(out), "--samples", "64", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "the user's file"
    assert json.loads((out / "summary.json").read_text())["steps"]["ok"]["rc"] == 0
