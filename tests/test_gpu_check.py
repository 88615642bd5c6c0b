"""`make gpu-check` on a machine without what it needs: one line naming it, nothing written."""

from __future__ import annotations

import importlib.util
import json
import os
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


def test_gpu_check_without_torch_names_what_to_install(tmp_path):
    """`make gpu-check` with a Python that has no torch (-S: no site-packages) is one line."""
    out = tmp_path / "gpu-check"
    no_torch = f"{sys.executable} -S"
    runs = {
        "python": [*no_torch.split(), "-m", "benchmarks.gpu_check", "--out", str(out)],
        "make": ["make", "-s", "gpu-check", f"PYTHON={no_torch}", f"GPU_CHECK_OUT={out}"],
    }
    for how, argv in runs.items():
        result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == (1 if how == "python" else 2), result.stderr  # make's 2
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("gpu-check:")]
        assert len(errors) == 1, result.stderr
        assert errors[0].startswith(f"gpu-check: error: no torch: {sys.executable} cannot")
        assert "torch==2.13.0" in errors[0] and "PYTHON=" in errors[0]
        assert not out.exists()


@pytest.mark.parametrize("missing", ["dali", "nvidia"])
def test_gpu_check_without_dali_names_the_wheel_per_cuda_version(
    monkeypatch, tmp_path, capsys, missing
):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if not name.startswith("nvidia.dali"):
            return real_find_spec(name, *args)
        if missing == "nvidia":  # no nvidia package at all: find_spec fails on the parent
            raise ModuleNotFoundError("No module named 'nvidia'", name="nvidia")
        return None

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    out = tmp_path / "gpu-check"
    assert gpu_check.main(["--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu-check: error: no DALI"), err
    assert "(this torch's: 12.8)" in err[0]
    assert "nvidia-dali-cuda120 for CUDA 12.x, nvidia-dali-cuda130 for CUDA 13.x" in err[0]
    assert not out.exists()


def test_make_gpu_check_uses_the_venv_unless_python_is_given(tmp_path):
    """README's GPU set-up makes .venv; `make gpu-check` runs its Python, or the one named."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")  # make -n only looks for it
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "MAKEFLAGS")}

    def python_used(*make_args: str, **extra_env: str) -> str:
        argv = ["make", "-n", "-s", "gpu-check", *make_args]
        result = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=60, env={**env, **extra_env}
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.split(" -m benchmarks.gpu_check ")[0]

    assert python_used(f"VENV={venv}") == f"{venv}/bin/python"
    assert python_used(f"VENV={tmp_path / 'none'}") == "python3"
    assert python_used(f"VENV={venv}", "PYTHON=/opt/py") == "/opt/py"
    assert python_used(f"VENV={venv}", PYTHON="/opt/env-py") == "/opt/env-py"


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
    seen = []

    def stand_in_steps(out, data, py, quick, rgb):
        seen.append((data, rgb))
        return [("ok", ok, 30), ("fails", failing, 30)]

    monkeypatch.setattr(gpu_check, "steps", stand_in_steps)
    out = tmp_path / "gpu-check"
    assert gpu_check.main(["--out", str(out), "--samples", "128"]) == 1  # one step failed
    summary = json.loads((out / "summary.json").read_text())
    assert {k: v["rc"] for k, v in summary["steps"].items()} == {
        "synth": 0,
        "build": 0,
        "synth-rgb": 0,
        "build-rgb": 0,
        "ok": 0,
        "fails": 3,
    }
    for name, channels in (("shards", 1), ("shards-rgb", 3)):  # grey and RGB data
        manifest = json.loads((out / "work" / name / "manifest.json").read_text())
        assert manifest["channels"] == channels
        assert 30 <= sum(split["samples"] for split in manifest["splits"].values()) <= 200
    assert seen[-1] == (out / "work" / "shards", out / "work" / "shards-rgb")
    assert (out / "ok.log").read_text().strip() == "fine"
    # the GPU train graph's operators by device, counted without a GPU
    for graph in ("grey", "rgb"):
        counts = summary["cpu_operators"][graph]
        assert counts["cpu"] <= 10 and counts["mixed"] == 4 and counts["gpu"] > 0, counts


def test_overwrite_replaces_only_what_gpu_check_wrote(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "require_gpu_stack", lambda: {"gpu": "stand-in"})
    ok = [sys.executable, "-c", "print('fine')"]
    monkeypatch.setattr(gpu_check, "steps", lambda out, data, py, quick, rgb: [("ok", ok, 30)])
    out = tmp_path / "gpu-check"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier run's
    (out / "notes.txt").write_text("the user's file")
    assert gpu_check.main(["--out", str(out), "--samples", "64", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "the user's file"
    assert json.loads((out / "summary.json").read_text())["steps"]["ok"]["rc"] == 0
