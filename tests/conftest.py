"""Shared fixtures: tiny zips in the real layout, and shards built from them; the helpers the
CLI tests share (``run_cli``, ``one_line_error``, ``snapshot``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sharding.build import ShardConfig, build
from sharding.synth import SynthConfig, generate

ROOT = Path(__file__).resolve().parent.parent
# The shard cache of s3:// sources (pipeline.cache): one per test session, never ~/.cache, and
# inherited by the CLIs the tests start.
os.environ["MASKDEPTH_CACHE"] = tempfile.mkdtemp(prefix="maskdepth-cache-")
EVA_ASSETS = ROOT.parent / "shared" / "eva-assets"

# 2 batches x 2 foregrounds x 4 backgrounds x 2 flips x 2 placements = 64 samples, 32 per split.
TINY = dict(batches=2, backgrounds=4, foregrounds=4, placements=2, seed=0)
TINY_PER_SHARD = 8


def run_cli(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m ...`` or a script from the repository root, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args],
        cwd=kwargs.pop("cwd", ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


def one_line_error(
    result: subprocess.CompletedProcess,
    *fragments: str,
    code: int | None = 1,
    prefix: str = "error: ",
    alone: bool = True,
) -> str:
    """A CLI's refusal as users see it: exit ``code``, no traceback, and one error line that
    starts with ``prefix`` and holds every fragment; returns that line.

    Args:
        code: the exit status; None accepts any non-zero one.
        prefix: how the error line starts (``"train.py: error"`` for train.py).
        alone: stderr holds that line and nothing else; False lets other lines (warnings, a
            progress bar) come with it, as long as only one starts with ``prefix``.
    """
    if code is None:
        assert result.returncode != 0, result.stderr
    else:
        assert result.returncode == code, f"exit {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    if alone:  # one line, no traceback (no progress bar off a TTY)
        assert len(lines) == 1, result.stderr
    errors = [line for line in lines if line.startswith(prefix)]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def snapshot(root: Path, dirs: bool = True) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes, None for a directory: what a refused command
    must leave as it was. ``dirs=False`` leaves directories out (an empty one made or removed
    then goes unseen)."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(Path(root).rglob("*"))
        if dirs or p.is_file()
    }


def omp_policy_when_torch_loads(module: str, given: str | None = None) -> str:
    """``OMP_WAIT_POLICY`` as it stands when ``import module`` first imports torch, in a fresh
    interpreter whose environment has it unset (or set to ``given``)."""
    probe = (
        "import os, sys\n"
        "seen = []\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and not seen:\n"
        "            seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
        "sys.meta_path.insert(0, Spy())\n"
        f"import {module}\n"
        "print(seen)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    if given:
        env["OMP_WAIT_POLICY"] = given
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def make_shards(zips_dir: Path, out: Path, **overrides) -> Path:
    zips = tuple(str(p) for p in sorted(zips_dir.glob("batch*_images.zip")))
    cfg = ShardConfig(zips=zips, out=str(out), samples_per_shard=TINY_PER_SHARD, **overrides)
    build(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_zips(tmp_path_factory) -> Path:
    """Two single-channel batch zips (batch2 is the test split)."""
    out = tmp_path_factory.mktemp("zips")
    generate(SynthConfig(out=str(out), **TINY), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_zips_rgb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zips_rgb")
    generate(SynthConfig(out=str(out), rgb=True, **TINY), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_shards(tiny_zips, tmp_path_factory) -> Path:
    """A single-channel shard directory with manifest: 32 train and 32 test samples."""
    return make_shards(tiny_zips, tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def tiny_shards_rgb(tiny_zips_rgb, tmp_path_factory) -> Path:
    """The RGB counterpart of ``tiny_shards``."""
    return make_shards(tiny_zips_rgb, tmp_path_factory.mktemp("shards_rgb"))
