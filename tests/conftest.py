"""Shared fixtures: tiny zips in the real layout, and shards built from them."""

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
