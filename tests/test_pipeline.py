"""The loaders: DALI CPU against the torch reference, augmentation, epochs, errors, CLIs."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import LoaderConfig, LoaderError, build_loader, denormalize
from pipeline.loader import dali_available
from pipeline.params import SAMPLE_FIELDS, colour_matrix, draw_params

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["dali", "torch"] if dali_available() else ["torch"]
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali not installed")

# Batches of 4: the 32-sample train split is 8 whole global batches (training drops a partial
# last one), so every sample is read once per epoch.
BASE = LoaderConfig(batch_size=4, num_threads=2, seed=3, rank=0, world_size=1)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def collect(loader, epoch: int = 0) -> dict[str, dict]:
    """{key: {part: tensor}} for one epoch, checking each key arrives once."""
    samples = {}
    for batch in loader.epoch(epoch):
        for i, key in enumerate(batch["key"]):
            assert key not in samples, f"{key} seen twice in one epoch"
            samples[key] = {p: batch[p][i] for p in ("bg", "fg_bg", "mask", "depth")}
    return samples


def keys_in(shard_dir: Path, split: str) -> set[str]:
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    keys = set()
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(shard_dir / shard["file"]) as archive:
            keys |= {m.name.split(".", 1)[0] for m in archive.getmembers()}
    return keys


def epoch_keys(loader, epoch: int) -> list[str]:
    return [k for batch in loader.epoch(epoch) for k in batch["key"]]


# ------------------------------------------------------------------------------ output contract


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_batch_contract(backend, rgb, tiny_shards, tiny_shards_rgb):
    data = tiny_shards_rgb if rgb else tiny_shards
    loader = build_loader(data, "train", replace(BASE, backend=backend))
    channels = 3 if rgb else 1
    assert (loader.backend, loader.channels, loader.num_samples, len(loader)) == (
        backend,
        channels,
        32,
        8,
    )
    batch = next(iter(loader.epoch(0)))
    assert batch["bg"].shape == batch["fg_bg"].shape == (4, channels, 160, 160)
    assert batch["mask"].shape == (4, 1, 160, 160)
    assert batch["depth"].shape == (4, 1, 80, 80)
    assert all(batch[p].dtype == torch.float32 for p in ("bg", "fg_bg", "mask", "depth"))
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["mask"].sum() > 0, "every synthetic sample has a foreground"
    assert batch["depth"].min() >= 0 and batch["depth"].max() <= 1
    assert len(batch["key"]) == 4 and all(isinstance(k, str) for k in batch["key"])
    bg = denormalize(batch["bg"], BASE)
    assert bg.min() >= 0 and bg.max() <= 1 and bg.std() > 0.01


@needs_dali
@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_dali_matches_torch_reference(rgb, augment, tiny_shards, tiny_shards_rgb):
    data = tiny_shards_rgb if rgb else tiny_shards
    cfg = replace(BASE, augment=augment)
    dali = collect(build_loader(data, "train", replace(cfg, backend="dali")))
    ref = collect(build_loader(data, "train", replace(cfg, backend="torch")))
    assert dali.keys() == ref.keys() and len(dali) == 32
    for key in dali:
        a, b = dali[key], ref[key]
        for part in ("bg", "fg_bg"):
            diff = (denormalize(a[part], cfg) - denormalize(b[part], cfg)).abs()
            # Both use libjpeg-turbo, but DALI's and PIL's IDCT/upsampling differ by a level or so.
            assert diff.mean() < 1.5 / 255 and diff.max() < 12 / 255, (key, part)
        assert (a["mask"] != b["mask"]).float().mean() < 0.002, key
        assert (a["depth"] - b["depth"]).abs().max() < 12 / 255, key


# ----------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_augmentation_changes_inputs_not_targets(backend, rgb, tiny_shards, tiny_shards_rgb):
    data = tiny_shards_rgb if rgb else tiny_shards
    cfg = replace(BASE, backend=backend)
    plain = collect(build_loader(data, "train", replace(cfg, augment=False)))
    aug = collect(build_loader(data, "train", cfg))
    for key in plain:
        for part in ("bg", "fg_bg"):
            assert (plain[key][part] - aug[key][part]).abs().mean() > 1e-3, (key, part)
        assert torch.equal(plain[key]["mask"], aug[key]["mask"])
        assert torch.equal(plain[key]["depth"], aug[key]["depth"])
    targets = collect(build_loader(data, "train", replace(cfg, augment_targets=True)))
    moved = [(plain[k]["depth"] - targets[k]["depth"]).abs().mean() > 1e-3 for k in plain]
    assert all(moved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jitter_without_noise(backend, tiny_shards_rgb):
    """noise_std=0 is allowed: jitter alone must still work (no noise bank is made)."""
    cfg = replace(BASE, backend=backend, noise_std=0.0)
    plain = collect(build_loader(tiny_shards_rgb, "train", replace(cfg, augment=False)))
    jittered = collect(build_loader(tiny_shards_rgb, "train", cfg))
    assert plain.keys() == jittered.keys()
    key = next(iter(plain))
    assert (plain[key]["bg"] - jittered[key]["bg"]).abs().mean() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_test_split_is_never_augmented(backend, tiny_shards):
    cfg = replace(BASE, backend=backend)
    on = collect(build_loader(tiny_shards, "test", cfg))
    off = collect(build_loader(tiny_shards, "test", replace(cfg, augment=False)))
    assert on.keys() == off.keys() and len(on) == 32
    assert all(torch.equal(on[k]["bg"], off[k]["bg"]) for k in on)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_drawn_parameters_in_seed_ranges(backend, rgb, tiny_shards, tiny_shards_rgb):
    data = tiny_shards_rgb if rgb else tiny_shards
    cfg = replace(BASE, backend=backend, return_params=True)
    batch = next(iter(build_loader(data, "train", cfg).epoch(0)))
    params = batch["params"]
    assert set(params) == {"bg", "fg_bg", "sample"}
    # BASE leaves flip and object jitter off: nothing mirrored, the object's pixels kept
    assert set(params["sample"]) == set(SAMPLE_FIELDS)
    assert not params["sample"]["flip"].any()
    assert (params["sample"]["object_gain"] == 1).all()
    assert (params["sample"]["object_shift"] == 0).all()
    for part in ("bg", "fg_bg"):
        p = params[part]
        for name in ("brightness", "contrast"):
            assert ((p[name] >= 0.925) & (p[name] <= 1.075)).all() and p[name].std() > 0
        if rgb:
            assert ((p["saturation"] >= 0.925) & (p["saturation"] <= 1.075)).all()
            assert ((p["hue"] >= -0.075) & (p["hue"] <= 0.075)).all() and p["hue"].std() > 0
        else:
            assert (p["saturation"] == 1).all() and (p["hue"] == 0).all()
    # bg and fg_bg draw independently
    assert not torch.equal(params["bg"]["brightness"], params["fg_bg"]["brightness"])


def test_noise_probability_and_factor_spread():
    keys = [f"batch1-{i}_{i % 7}_{i % 2}_{i % 3}" for i in range(4000)]
    params = draw_params(keys, seed=0, epoch=0, cfg=BASE, channels=3)
    for part in ("bg", "fg_bg"):
        rate = params[part]["noise"].mean()
        assert abs(rate - 0.2) < 0.03, rate  # 4000 draws: 5 sigma is about 0.03
        b = params[part]["brightness"]
        assert b.min() < 0.93 and b.max() > 1.07 and abs(b.mean() - 1) < 0.005
    both = (params["bg"]["noise"] & params["fg_bg"]["noise"]).mean()
    assert abs(both - 0.04) < 0.015  # independent: 0.2 * 0.2
    other_epoch = draw_params(keys, seed=0, epoch=1, cfg=BASE, channels=3)
    assert not np.array_equal(params["bg"]["brightness"], other_epoch["bg"]["brightness"])


def test_paired_jitter_gives_fg_bg_the_draws_of_bg():
    keys = [f"batch1-{i}_{i % 7}_{i % 2}_{i % 3}" for i in range(2000)]
    apart = draw_params(keys, seed=0, epoch=0, cfg=BASE, channels=3)
    paired = draw_params(keys, seed=0, epoch=0, cfg=replace(BASE, paired_jitter=True), channels=3)
    # noise_offset too: the noise values are the same slice of the torch path's noise bank
    for name in ("brightness", "contrast", "saturation", "hue", "noise", "noise_offset"):
        assert np.array_equal(paired["fg_bg"][name], paired["bg"][name]), name
        assert not np.array_equal(apart["fg_bg"][name], apart["bg"][name]), name
        assert np.array_equal(paired["bg"][name], apart["bg"][name]), name  # bg's draws kept


PATHS = [("torch", "torch")] + ([("dali", "torch"), ("dali", "dali")] if dali_available() else [])


@pytest.mark.parametrize(("backend", "where"), PATHS, ids=[f"{b}-{w}" for b, w in PATHS])
def test_paired_jitter_reaches_both_images_in_each_backend(backend, where, tiny_shards):
    """Where bg and fg_bg had the same pixels, paired jitter and noise keep them (nearly)
    equal; drawn apart, the jitter and noise open a gap of several grey levels there."""
    cfg = replace(
        BASE, backend=backend, augment_in=where, return_params=True, noise_prob=1.0, seed=1
    )
    plain = collect(build_loader(tiny_shards, "train", replace(cfg, augment=False)))

    def widest_gap(paired: bool) -> float:
        loader = build_loader(tiny_shards, "train", replace(cfg, paired_jitter=paired))
        batch = next(iter(loader.epoch(0)))
        drawn = batch["params"]
        assert torch.equal(drawn["bg"]["brightness"], drawn["fg_bg"]["brightness"]) == paired
        gap = 0.0
        for i, key in enumerate(batch["key"]):
            fg_bg, bg = (denormalize(batch[part][i], cfg) for part in ("fg_bg", "bg"))
            same = denormalize(plain[key]["fg_bg"], cfg) == denormalize(plain[key]["bg"], cfg)
            gap = max(gap, (fg_bg - bg)[same].abs().max().item())
        return gap

    # contrast blends with each image's own mean grey, so paired leaves a sliver of a level
    assert widest_gap(paired=True) < 0.01 < widest_gap(paired=False)


def test_noise_is_applied_to_flagged_samples_only(tiny_shards):
    cfg = replace(BASE, backend=BACKENDS[0], return_params=True, brightness=0.0, contrast=0.0)
    flat = collect(build_loader(tiny_shards, "train", replace(cfg, augment=False)))
    noisy_seen = clean_seen = 0
    for batch in build_loader(tiny_shards, "train", replace(cfg, noise_prob=0.5)).epoch(0):
        for i, key in enumerate(batch["key"]):
            residual = denormalize(batch["bg"][i], cfg) - denormalize(flat[key]["bg"], cfg)
            if batch["params"]["bg"]["noise"][i]:
                noisy_seen += 1
                assert 0.03 < residual.std() < 0.07, key  # std 0.05, a little lost to clipping
            else:
                clean_seen += 1
                assert residual.abs().max() < 1e-5, key
    assert noisy_seen and clean_seen


def test_colour_matrix_turns_hue_like_hsv_and_keeps_grey():
    import colorsys

    reddish = (0.8, 0.3, 0.2)
    h, s, v = colorsys.rgb_to_hsv(*reddish)
    expected = colorsys.hsv_to_rgb((h + 0.05) % 1, s, v)  # red turns towards yellow
    matrix = colour_matrix(np.array([1.0]), np.array([0.05]))[0]
    turned = matrix @ np.array(reddish)
    assert np.abs(turned - np.array(expected)).max() < 0.08
    assert turned[1] > reddish[1]  # green up, the HSV direction
    grey = np.full(3, 0.4)
    both = colour_matrix(np.array([1.07]), np.array([-0.07]))[0]
    assert np.allclose(both @ grey, grey)


# --------------------------------------------------------------------------------------- epochs


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_sees_every_key_once_and_reshuffles(backend, tiny_shards):
    loader = build_loader(tiny_shards, "train", replace(BASE, backend=backend, augment=False))
    first, second = epoch_keys(loader, 0), epoch_keys(loader, 1)
    assert sorted(first) == sorted(second) == sorted(keys_in(tiny_shards, "train"))
    assert first != second


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_and_epoch_gives_identical_batches(backend, tiny_shards_rgb):
    cfg = replace(BASE, backend=backend)
    a = list(build_loader(tiny_shards_rgb, "train", cfg).epoch(2))
    # a fresh loader, as after a restart: resuming at epoch 2 sees the same data
    b = list(build_loader(tiny_shards_rgb, "train", cfg).epoch(2))
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert all(torch.equal(x[p], y[p]) for p in ("bg", "fg_bg", "mask", "depth"))
    other_seed = epoch_keys(build_loader(tiny_shards_rgb, "train", replace(cfg, seed=4)), 2)
    assert other_seed != [k for batch in a for k in batch["key"]]


DROPPED_DALI = """
import gc, sys, weakref
from dataclasses import replace
import pipeline.torch_backend as torch_backend
from pipeline import LoaderConfig, build_loader

cfg = LoaderConfig(batch_size=4, num_threads=2, augment=False, rank=0, world_size=1)
gc.disable()  # the dropped pipeline waits for whoever collects first
dali = build_loader(sys.argv[1], "train", replace(cfg, backend="dali"))
list(dali.epoch(0))
pipe = weakref.ref(dali._dali.pipe)
cycle = [dali]  # as a held error's traceback would keep it
cycle.append(cycle)
del dali, cycle
assert pipe() is not None, "the pipeline was freed, not left to the collector"
real_decode, collected = torch_backend.decode, []

def decode(*args):
    if not collected:  # in each worker, once: what an allocation-triggered collection does
        collected.append(gc.collect())
    return real_decode(*args)

torch_backend.decode = decode
torch = build_loader(sys.argv[1], "train", replace(cfg, backend="torch"))
print(sum(len(b["key"]) for b in torch.epoch(0)), pipe() is None)
"""


@needs_dali
def test_torch_workers_survive_a_dropped_dali_loader(tiny_shards):
    """A DALI pipeline left in a reference cycle is finalized before torch forks its workers:
    finalized in a worker, it would join threads the fork did not copy, and hang or crash."""
    done = subprocess.run(
        [sys.executable, "-c", DROPPED_DALI, str(tiny_shards)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["32", "True"]  # every sample; finalized in the parent


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_split_without_overlap_or_gap(backend, tiny_shards):
    cfg = replace(BASE, backend=backend, augment=False, batch_size=4)
    for epoch in (0, 1):
        ranks = [
            epoch_keys(
                build_loader(tiny_shards, "train", replace(cfg, rank=r, world_size=2)), epoch
            )
            for r in range(2)
        ]
        assert not set(ranks[0]) & set(ranks[1])
        assert sorted(ranks[0] + ranks[1]) == sorted(keys_in(tiny_shards, "train"))
        assert len(ranks[0]) == len(ranks[1]) == 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_and_partial_last_batch(backend, tiny_shards):
    cfg = replace(BASE, backend=backend, augment=False, batch_size=6)
    partial = build_loader(tiny_shards, "test", cfg)
    drop = build_loader(tiny_shards, "test", replace(cfg, last_batch="drop"))
    assert [len(b["key"]) for b in partial.epoch(0)] == [6, 6, 6, 6, 6, 2]
    assert [len(b["key"]) for b in drop.epoch(0)] == [6, 6, 6, 6, 6]
    assert (len(partial), len(drop)) == (6, 5)


def test_shard_defaults_without_distributed(tiny_shards):
    loader = build_loader(tiny_shards, "train", LoaderConfig(backend="torch", batch_size=8))
    assert (loader.rank, loader.world_size) == (0, 1)


def test_url_source_matches_directory(tiny_shards):
    url = f"{tiny_shards}/train-{{000000..000003}}.tar"
    cfg = replace(BASE, backend=BACKENDS[0], augment=False)
    from_url = build_loader(url, "train", cfg)
    assert (from_url.channels, from_url.num_samples) == (1, 32)
    assert sorted(epoch_keys(from_url, 0)) == sorted(keys_in(tiny_shards, "train"))


# --------------------------------------------------------------------------------------- errors

PROBE = """
import sys
from pipeline import LoaderConfig, LoaderError, build_loader
cfg = LoaderConfig(backend=sys.argv[2], batch_size=4, rank=0, world_size=1)
try:
    for batch in build_loader(sys.argv[1], "train", cfg).epoch(0):
        pass
except LoaderError as exc:
    print(f"LoaderError: {exc}", file=sys.stderr)
    sys.exit(3)
"""


def probe(source: str, backend: str) -> subprocess.CompletedProcess:
    """Build and read in a subprocess: a hang fails the test by timeout instead of blocking."""
    return run_cli("-c", PROBE, source, backend, timeout=60)


@pytest.fixture
def shard_copy(tiny_shards, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_shards, tmp_path / "shards"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_shard_is_named(backend, shard_copy):
    victim = shard_copy / "train-000002.tar"
    victim.unlink()
    result = probe(str(shard_copy), backend)
    assert result.returncode == 3, result.stderr
    assert f"{victim}: shard not found" in result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_shard_is_named(backend, shard_copy):
    victim = shard_copy / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[:20000])
    result = probe(str(shard_copy), backend)
    assert result.returncode == 3, result.stderr
    assert f"{victim}: truncated" in result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_shard_is_named(backend, shard_copy):
    victim = shard_copy / "train-000003.tar"
    victim.write_bytes(np.random.default_rng(0).bytes(victim.stat().st_size))
    result = probe(str(shard_copy), backend)
    assert result.returncode == 3, result.stderr
    assert f"{victim}: not a tar archive" in result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_jpeg_inside_shard_is_named(backend, shard_copy):
    victim = shard_copy / "train-000000.tar"
    data = bytearray(victim.read_bytes())
    first_jpeg = data.index(b"\xff\xd8")  # keep the tar structure, break the image
    data[first_jpeg : first_jpeg + 600] = b"\x00" * 600
    victim.write_bytes(bytes(data))
    result = probe(str(shard_copy), backend)
    assert result.returncode == 3, result.stderr
    assert "train-000000.tar" in result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_damage_inside_a_later_shard_names_that_shard(backend, shard_copy):
    """20 KB overwritten inside train-000001.tar (same size): the error names that shard and
    the member the failing batch read, not the first shard of the list."""
    victim = shard_copy / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[30000:50000] = bytes(20000)
    victim.write_bytes(bytes(data))
    result = probe(str(shard_copy), backend)
    assert result.returncode == 3, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"LoaderError: {victim}: ") and "cannot decode" in line, line
    assert "train-000000.tar" not in line and "train-000003.tar" not in line


@pytest.mark.parametrize(
    "pattern",
    ["train-{000000..000003.tar", "train-{000000..00000x}.tar", "train-{000000..000009}.tar"],
)
def test_bad_url_pattern_is_named(pattern, tiny_shards):
    url = f"{tiny_shards}/{pattern}"
    with pytest.raises(LoaderError, match="train-"):
        build_loader(url, "train", BASE)


def test_bad_config_values_fail_loudly(tiny_shards):
    with pytest.raises(LoaderError, match="backend='jax'"):
        LoaderConfig(backend="jax")
    with pytest.raises(LoaderError, match="last_batch"):
        LoaderConfig(last_batch="keep")
    with pytest.raises(LoaderError, match="split='val'"):
        build_loader(tiny_shards, "val", BASE)
    with pytest.raises(LoaderError, match="nowhere: no such dataset directory"):
        build_loader(tiny_shards / "nowhere", "train", BASE)
    with pytest.raises(LoaderError, match=r"manifest\.json: not found"):
        build_loader(tiny_shards.parent, "train", BASE)


@pytest.mark.parametrize("module", ["pipeline.preview", "benchmarks.loaders", "sharding.verify"])
def test_a_zip_where_shards_belong_gets_verifys_line(module, tiny_zips, tmp_path):
    zip_path = sorted(tiny_zips.glob("*.zip"))[0]
    before = zip_path.read_bytes()
    args = ["--data", str(zip_path)] if module != "sharding.verify" else [str(zip_path)]
    if module == "pipeline.preview":
        args += ["--out", str(tmp_path / "grid.png")]
    result = run_cli("-m", module, *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert f"{zip_path}: is a zip; a shard directory (with manifest.json) is needed here" in line
    assert "python -m sharding.build ZIPS --out DIR" in line
    assert zip_path.read_bytes() == before and not list(tmp_path.iterdir())


def test_import_pipeline_without_dali():
    code = (
        "import sys; sys.modules['nvidia'] = None\n"
        "import pipeline\n"
        "from pipeline.loader import dali_available\n"
        "assert not dali_available() and 'nvidia.dali' not in sys.modules\n"
    )
    result = run_cli("-c", code, timeout=60)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------ CLIs


def test_preview_writes_png(tiny_shards_rgb, tmp_path):
    out = tmp_path / "grid.png"
    result = run_cli(
        "-m", "pipeline.preview", "--data", str(tiny_shards_rgb), "--out", str(out), "--n", "3"
    )
    assert result.returncode == 0, result.stderr
    from PIL import Image

    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 4 * 160 and image.height > 3 * 160
    again = run_cli("-m", "pipeline.preview", "--data", str(tiny_shards_rgb), "--out", str(out))
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert not list(tmp_path.glob(".tmp-*"))


def test_benchmark_runs_end_to_end(tiny_shards, tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(
        "-m",
        "benchmarks.loaders",
        "--data",
        str(tiny_shards),
        "--json",
        str(out),
        "--batch-size",
        "8",
        "--batches",
        "2",
        "--rounds",
        "2",
        "--both-augment-in",
        "--no-progress",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report) == {"machine", "data", "loaders", "ratios"}
    names = {"seed-baseline", "webdataset", "decode-ceiling"}
    names |= {"dali-cpu", "dali-cpu [augment-in=dali]"} if dali_available() else set()
    assert names <= set(report["loaders"])
    for name, r in report["loaders"].items():
        assert len(r["rounds"]) == 2 and all(rate > 0 for rate in r["rounds"]), name
        assert r["samples_per_s"] == statistics.median(r["rounds"]), name
    assert report["data"] == {**report["data"], "channels": 1, "samples": 32, "rounds": 2}
    machine = report["machine"]
    assert machine["cores"] >= 1
    assert len(machine["load_average_at_start"]) == len(machine["load_average_at_end"]) == 3
    if dali_available():
        assert report["loaders"]["dali-cpu"]["augment_in"] == "torch"  # auto, on the CPU
        assert report["loaders"]["dali-cpu [augment-in=dali]"]["augment_in"] == "dali"
        assert {"dali-cpu / decode-ceiling", "dali-cpu / seed-baseline"} <= set(report["ratios"])
        assert "dali-cpu [augment-in=dali] / dali-cpu" in report["ratios"]
    assert "seed-baseline" in result.stdout


@needs_dali
def test_dali_startup_benchmark_runs_end_to_end(tiny_shards, tmp_path):
    out = tmp_path / "startup.json"
    result = run_cli(
        "-m", "benchmarks.dali_startup", "--data", str(tiny_shards), "--json", str(out),
        "--epochs", "2", "--batch-size", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["splits"]) == {"train", "test"}
    for split in report["splits"].values():
        assert [e["batches"] for e in split["epochs"]] == [4, 4]  # 32 samples, batches of 8
        assert all(e["first_batch_s"] > 0 for e in split["epochs"])
    for split in ("train", "test"):  # one pipeline per split, reset every epoch
        assert report["splits"][split]["pipeline"] == "built once, reset"
        assert report["splits"][split]["builds"] == 1
    assert "epoch start costs" in result.stdout


@needs_dali
def test_cpu_stage_benchmark_runs_end_to_end(tiny_shards, tmp_path):
    out = tmp_path / "cpu_stage.json"
    result = run_cli(
        "-m", "benchmarks.cpu_stage", "--data", str(tiny_shards), "--json", str(out),
        "--batch-size", "8", "--batches", "2", "--rounds", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["graphs"]) == {"grey", "rgb"} and report["batch_size"] == 8
    for graph in report["graphs"].values():
        assert graph["operators"]["cpu"] == 5 and graph["operators"]["mixed"] == 4
        assert len(graph["rounds"]) == 2 and graph["source_ms"] > 0 and graph["feed_ms"] > 0
    assert "GPU train graph: cpu 5" in result.stdout


def test_benchmark_rejects_zero_rounds(tiny_shards):
    result = run_cli("-m", "benchmarks.loaders", "--data", str(tiny_shards), "--rounds", "0")
    assert result.returncode == 2 and "--rounds" in result.stderr


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dali_gpu_matches_cpu(tiny_shards_rgb):
    # the torch path on both devices: the same draws, and noise slices from the same bank
    cfg = replace(BASE, backend="dali", augment_in="torch")
    gpu_batches = list(build_loader(tiny_shards_rgb, "train", replace(cfg, device="cuda")).epoch(0))
    assert all(b["bg"].is_cuda and b["mask"].is_cuda for b in gpu_batches)
    gpu = {k: b["bg"][i].cpu() for b in gpu_batches for i, k in enumerate(b["key"])}
    cpu = collect(build_loader(tiny_shards_rgb, "train", cfg))
    assert gpu.keys() == cpu.keys()
    for key in gpu:
        diff = (denormalize(gpu[key], cfg) - denormalize(cpu[key]["bg"], cfg)).abs()
        # nvJPEG differs from libjpeg-turbo by a few levels
        assert diff.mean() < 3 / 255, key
