"""sharding.synth: compression, Ctrl-C, assets, --out refusal, depth of every object, help.

The basic layout, split and determinism tests live in test_sharding.py; these cover the
options and failure paths, with small fake asset folders made in ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from benchmarks.shard_vs_unzip import build_parser as bench_parser
from benchmarks.shard_vs_unzip import zip_compression
from sharding.atomic import TMP_PREFIX
from sharding.synth import SynthConfig, SynthError, asset_plan, build_parser, generate
from tests.conftest import EVA_ASSETS, ROOT, make_shards, run_cli
from tests.test_cli import snapshot

SMALL = dict(batches=2, backgrounds=2, foregrounds=2, placements=1, seed=0)


def synth_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli("-m", "sharding.synth", *args, timeout=timeout)


def assert_one_line(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert result.returncode == code, f"exit {result.returncode}\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def read_image(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(zf.read(name))))


def erode(mask: np.ndarray, steps: int = 1, border: bool = False) -> np.ndarray:
    """Binary erosion by a 3×3 square, ``steps`` times; beyond the edges counts as ``border``."""
    for _ in range(steps):
        padded = np.pad(mask, 1, constant_values=border)
        mask = np.logical_and.reduce(
            [padded[1 + dy : padded.shape[0] - 1 + dy, 1 + dx : padded.shape[1] - 1 + dx]
             for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        )  # fmt: skip
    return mask


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    return ~erode(~mask, steps, border=True)


# --- 1. --compression -----------------------------------------------------------------------


def test_deflated_zips_hold_the_same_members_and_build_reads_them(tmp_path):
    stored = generate(SynthConfig(out=str(tmp_path / "s"), **SMALL), progress=False)
    deflated = generate(
        SynthConfig(out=str(tmp_path / "d"), compression="deflated", **SMALL), progress=False
    )
    for s_path, d_path in zip(stored, deflated, strict=True):
        with zipfile.ZipFile(s_path) as s_zip, zipfile.ZipFile(d_path) as d_zip:
            assert {i.compress_type for i in s_zip.infolist()} == {zipfile.ZIP_STORED}
            assert {i.compress_type for i in d_zip.infolist()} == {zipfile.ZIP_DEFLATED}
            assert d_zip.testzip() is None
            assert s_zip.namelist() == d_zip.namelist()
            assert all(s_zip.read(n) == d_zip.read(n) for n in s_zip.namelist())
    assert deflated[0].stat().st_size < stored[0].stat().st_size  # it really is compressed
    shards = make_shards(tmp_path / "d", tmp_path / "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 4  # 1 fg × 2 bgs × 2 flips
    assert manifest["splits"]["test"]["samples"] == 4 and manifest["skipped"]["count"] == 0


def test_compression_option_on_the_command_line(tmp_path):
    out = tmp_path / "z"
    ok = synth_cli("--out", str(out), "--compression", "deflated", *small_args())
    assert ok.returncode == 0, ok.stderr
    with zipfile.ZipFile(out / "batch1_images.zip") as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    bad = synth_cli("--out", str(tmp_path / "b"), "--compression", "bzip2", *small_args())
    assert bad.returncode == 2 and "--compression" in bad.stderr
    assert not (tmp_path / "b").exists()


def small_args(**overrides) -> list[str]:
    settings = {**SMALL, **overrides}
    return [arg for key, value in settings.items() for arg in (f"--{key}", str(value))]


# --- 2. benchmarks.shard_vs_unzip -----------------------------------------------------------


def test_benchmark_records_the_zips_compression(tmp_path):
    cfg = SynthConfig(out=str(tmp_path / "d"), compression="deflated", **SMALL)
    zips = [str(p) for p in generate(cfg, progress=False)]
    out = tmp_path / "bench.json"
    result = run_cli("-m", "benchmarks.shard_vs_unzip", *zips, "--json", str(out), "--workers", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["zip_compression"]["method"] == "deflated"
    # 2 backgrounds + 4 samples × 3 parts, per batch
    assert report["zip_compression"]["members"] == {"deflated": 2 * (2 + 4 * 3)}
    assert report["samples"] == 8
    assert "members deflated" in result.stdout


def test_zip_compression_names_stored_and_mixed(tiny_zips, tmp_path):
    zips = [str(p) for p in sorted(tiny_zips.glob("*.zip"))]
    assert zip_compression(zips)["method"] == "stored"
    deflated = generate(
        SynthConfig(out=str(tmp_path), compression="deflated", **SMALL), progress=False
    )
    assert zip_compression([zips[0], str(deflated[0])])["method"] == "mixed"


def test_benchmark_help_says_how_to_make_deflated_zips():
    result = run_cli("-m", "benchmarks.shard_vs_unzip", "--help")
    assert result.returncode == 0
    assert "python -m sharding.synth --out data/zips-deflated --compression deflated" in (
        result.stdout
    )
    for action in bench_parser()._actions:
        assert action.help, f"{action.dest} has no help"


@pytest.mark.parametrize("option", ["--tmp", "--json"])
def test_benchmark_missing_directory_is_one_line(tiny_zips, tmp_path, option):
    (tmp_path / "keep.txt").write_text("the user's file")
    before = snapshot(tmp_path)
    missing = tmp_path / "missing_dir"
    target = str(missing) if option == "--tmp" else str(missing / "bench.json")
    zips = [str(p) for p in sorted(tiny_zips.glob("*.zip"))]
    result = run_cli("-m", "benchmarks.shard_vs_unzip", *zips, option, target)
    # --json: the message every benchmark gives (benchmarks.report.missing_dir)
    said = "error: --tmp " if option == "--tmp" else "error: the directory of --json "
    line = assert_one_line(result, 1, said, str(missing))
    assert "Traceback" not in result.stderr and "tmp" not in line.split(str(missing))[-1]
    assert snapshot(tmp_path) == before


# --- 3. Ctrl-C ------------------------------------------------------------------------------


PLACEMENTS = 400


def start_synth(out: Path, *args: str) -> subprocess.Popen:
    """A synth run in its own process group (as a terminal runs it), slow enough to interrupt."""
    cmd = [sys.executable, "-m", "sharding.synth", "--out", str(out), "--batches", "3"]
    # 3,200 samples a batch: a second or more even on an idle machine, so Ctrl-C lands inside.
    cmd += ["--backgrounds", "4", "--foregrounds", "3", "--placements", str(PLACEMENTS), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"synth ended before the interrupt: {proc.communicate()}"
        assert time.monotonic() < deadline, "synth never got there"
        time.sleep(0.01)


def zips_in(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("batch*_images.zip"))


def interrupt(proc: subprocess.Popen, presses: int = 1) -> tuple[float, str]:
    """Ctrl-C as a terminal sends it (to the whole group); return seconds to exit and stderr."""
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    for _ in range(presses - 1):  # an impatient user: again while the first is cleaned up
        time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("synth kept running 30 s after Ctrl-C")
    return time.monotonic() - sent, stderr


def assert_group_gone(proc: subprocess.Popen) -> None:
    """No worker of the interrupted run is still alive (they share its process group)."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("worker processes outlived the interrupted synth")


@pytest.mark.parametrize(("workers", "presses"), [(1, 1), (2, 2)])
def test_ctrl_c_stops_at_once_and_writes_nothing_more(tmp_path, workers, presses):
    out = tmp_path / "zips"
    proc = start_synth(out, "--workers", str(workers))
    wait_for(lambda: len(list(out.glob(f"{TMP_PREFIX}*"))) == workers, proc)
    time.sleep(0.3)  # well inside the first batches (each takes over a second)
    before = zips_in(out)
    elapsed, stderr = interrupt(proc, presses)
    assert proc.returncode == 130, stderr
    assert elapsed < 2.0, f"took {elapsed:.1f} s to stop"
    assert zips_in(out) == before == []  # nothing was finished after the signal
    assert not list(out.glob(f"{TMP_PREFIX}*"))
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("interrupted: ")
    assert "complete in " in lines[0] and ": none;" in lines[0]
    assert "not written: batch1, batch2, batch3" in lines[0]
    assert_group_gone(proc)


def test_ctrl_c_after_a_finished_batch_keeps_it_and_says_so(tmp_path):
    out = tmp_path / "zips"
    proc = start_synth(out, "--workers", "1")
    batch1 = out / "batch1_images.zip"
    wait_for(lambda: batch1.exists() and list(out.glob(f"{TMP_PREFIX}*")), proc)
    time.sleep(0.2)
    elapsed, stderr = interrupt(proc)
    assert proc.returncode == 130 and elapsed < 2.0, (elapsed, stderr)
    assert zips_in(out) == ["batch1_images.zip"]
    assert not list(out.glob(f"{TMP_PREFIX}*"))
    assert f"complete in {out}: batch1; not written: batch2, batch3" in stderr
    with zipfile.ZipFile(out / "batch1_images.zip") as zf:  # the kept batch is whole
        assert zf.testzip() is None
        assert sum(n.startswith("fg_bg_jpg/") for n in zf.namelist()) == 1 * 4 * 2 * PLACEMENTS
    assert_group_gone(proc)


# --- 4. --assets: never more than the folder holds, never a test object in training ---------


def fake_assets(root: Path, backgrounds: int, foregrounds: int) -> Path:
    """Uniform light photos, and cut-outs each of one grey that names it: 20, 50, 80, ..."""
    (root / "bg").mkdir(parents=True)
    (root / "fg").mkdir()
    for i in range(backgrounds):
        Image.new("RGB", (160, 160), (220 + 10 * i,) * 3).save(root / "bg" / f"bg{i:03}.jpg")
    for i in range(foregrounds):
        fg = np.zeros((60, 40, 4), np.uint8)
        fg[..., :3] = 20 + 30 * i
        fg[5:55, 5:35, 3] = 255
        Image.fromarray(fg, "RGBA").save(root / "fg" / f"fg{i:03}.png")
    return root


def cutouts_used(zip_path: Path, foregrounds: int) -> set[int]:
    """Which fake cut-out (by its grey) each sample of the zip shows."""
    used = set()
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            if name.startswith("fg_bg_jpg/"):
                stem = name.removeprefix("fg_bg_jpg/fg_bg_")
                fg_bg = read_image(zf, name)
                mask = erode(read_image(zf, f"mask_black_jpg/bg_mask_{stem}") > 127, 3)
                grey = float(np.median(fg_bg[mask]))
                index = round((grey - 20) / 30)
                assert 0 <= index < foregrounds and abs(grey - (20 + 30 * index)) < 6, grey
                used.add(index)
    return used


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--foregrounds", "6", "--foregrounds 6 but fg/ holds 4 cut-outs"),
        ("--backgrounds", "5", "--backgrounds 5 but bg/ holds 3 photos"),
    ],
)
def test_more_assets_than_the_folder_holds_is_refused(tmp_path, option, value, fragment):
    assets = fake_assets(tmp_path / "assets", backgrounds=3, foregrounds=4)
    out = tmp_path / "zips"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    before = snapshot(tmp_path)
    args = small_args(**{option.removeprefix("--"): value})
    result = synth_cli("--assets", str(assets), "--out", str(out), "--overwrite", *args)
    assert_one_line(result, 1, "error: ", fragment, "--reuse-assets")
    assert snapshot(tmp_path) == before


def test_an_unreadable_asset_is_named_before_out_is_touched(tmp_path):
    assets = fake_assets(tmp_path / "assets", backgrounds=2, foregrounds=2)
    broken = assets / "fg" / "fg001.png"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated
    out = tmp_path / "zips"
    generate(SynthConfig(out=str(out), **SMALL), progress=False)
    before = snapshot(tmp_path)
    result = synth_cli("--assets", str(assets), "--out", str(out), "--overwrite", *small_args())
    assert_one_line(result, 1, f"error: {broken}: not a readable image")
    assert snapshot(tmp_path) == before  # the earlier zips survive the refused --overwrite


def test_reused_assets_never_show_a_test_object_in_training(tmp_path):
    assets = fake_assets(tmp_path / "assets", backgrounds=2, foregrounds=4)
    out = tmp_path / "zips"
    args = small_args(backgrounds=3, foregrounds=6)  # more of both than the folder holds
    result = synth_cli("--assets", str(assets), "--out", str(out), "--reuse-assets", *args)
    assert result.returncode == 0, result.stderr
    train, test = (cutouts_used(out / f"batch{k}_images.zip", 4) for k in (1, 2))
    assert train and test and not train & test
    assert train | test == {0, 1, 2, 3}  # every cut-out used, some twice (6 ids, 4 files)


@given(
    batches=st.integers(1, 12),
    extra=st.integers(0, 40),
    n_fg=st.integers(2, 30),
    n_bg=st.integers(1, 10),
    backgrounds=st.integers(1, 20),
)
def test_asset_plan_keeps_test_cutouts_out_of_training(batches, extra, n_fg, n_bg, backgrounds):
    cfg = SynthConfig(
        out="unused", batches=batches, foregrounds=batches + extra, backgrounds=backgrounds,
        assets="a", reuse_assets=True,
    )  # fmt: skip
    bg_plan, fg_plan = asset_plan(cfg, n_bg, n_fg)
    assert len(bg_plan) == backgrounds and set(bg_plan) <= set(range(n_bg))
    assert len(fg_plan) == cfg.foregrounds and set(fg_plan) <= set(range(n_fg))
    if cfg.foregrounds <= n_fg:
        assert fg_plan == list(range(cfg.foregrounds))  # nothing reused when there is enough
    if batches > 1:
        test_ids = cfg.fg_split()[-1]
        test_files = {fg_plan[f - 1] for f in test_ids}
        train_files = {fg_plan[f - 1] for ids in cfg.fg_split()[:-1] for f in ids}
        assert not test_files & train_files
    strict = dataclasses.replace(cfg, reuse_assets=False)
    if cfg.foregrounds > n_fg or backgrounds > n_bg:
        with pytest.raises(SynthError, match="--reuse-assets"):
            asset_plan(strict, n_bg, n_fg)
    else:
        assert asset_plan(strict, n_bg, n_fg) == (bg_plan, fg_plan)


@pytest.mark.skipif(not EVA_ASSETS.is_dir(), reason="../shared/eva-assets not present")
def test_real_assets_refuse_150_cutouts_of_100(tmp_path):
    out = tmp_path / "zips"
    args = small_args(foregrounds=150)
    result = synth_cli("--assets", str(EVA_ASSETS), "--out", str(out), *args)
    assert_one_line(result, 1, "--foregrounds 150 but fg/ holds 100 cut-outs")
    assert not out.exists()


# --- 5. a non-empty --out -------------------------------------------------------------------


def test_non_empty_out_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "zips"
    generate(SynthConfig(out=str(out), **{**SMALL, "batches": 2}), progress=False)
    (out / "notes.txt").write_text("the user's file")
    before = snapshot(tmp_path)
    result = synth_cli("--out", str(out), *small_args(seed=1))
    assert_one_line(result, 1, f"error: --out {out}: directory is not empty", "--overwrite")
    assert snapshot(tmp_path) == before
    with pytest.raises(SynthError, match="not empty"):
        generate(SynthConfig(out=str(out), **SMALL), progress=False)
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_earlier_batch_zips(tmp_path):
    out = tmp_path / "zips"
    generate(SynthConfig(out=str(out), **{**SMALL, "batches": 3, "foregrounds": 3}), False)
    old = (out / "batch1_images.zip").read_bytes()
    (out / "notes.txt").write_text("the user's file")
    (out / "batch_notes.zip").write_bytes(b"not ours")
    (out / f"{TMP_PREFIX}999-batch2_images.zip").write_bytes(b"a killed run's leftover")
    result = synth_cli("--out", str(out), "--overwrite", *small_args(seed=1))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    # batch3 of the earlier, 3-batch set is gone: the two sets never mix
    assert names == ["batch1_images.zip", "batch2_images.zip", "batch_notes.zip", "notes.txt"]
    assert (out / "batch1_images.zip").read_bytes() != old
    assert (out / "notes.txt").read_text() == "the user's file"


def test_out_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "zips"
    out.write_text("a file")
    result = synth_cli("--out", str(out), "--overwrite", *small_args())
    assert_one_line(result, 1, f"--out {out}: exists and is not a directory")
    assert out.read_text() == "a file"


# --- 6. depth: every pasted object shows, also one pasted above the horizon ------------------


def test_every_pasted_object_has_its_own_depth(tmp_path):
    (path,) = generate(
        SynthConfig(out=str(tmp_path), batches=1, backgrounds=4, foregrounds=2, placements=8),
        progress=False,
    )
    above_horizon = 0
    with zipfile.ZipFile(path) as zf:
        stems = [
            n.removeprefix("fg_bg_jpg/fg_bg_") for n in zf.namelist() if n.startswith("fg_bg_jpg/")
        ]
        for stem in stems:
            depth = read_image(zf, f"depth_fg_bg_jpg/depth_fg_bg_{stem}").astype(float)
            mask = read_image(zf, f"mask_black_jpg/bg_mask_{stem}") > 127
            mask_image = Image.fromarray(mask.astype(np.uint8) * 255)
            small = np.asarray(mask_image.resize(depth.shape[::-1], Image.BILINEAR)) > 127
            inside, outside = erode(small, 1), ~dilate(small, 2)
            # The room's depth depends on the row only: the rest of the row is the background.
            room = np.array([np.median(depth[r][outside[r]]) for r in range(depth.shape[0])])
            rows = np.nonzero(inside)[0]
            difference = np.abs(depth[inside] - room[rows]).mean()
            assert difference > 5, f"{stem}: object depth {difference:.1f} from the room's"
            horizon = np.argmax(room < 250)  # the first row of floor
            foot = np.nonzero(small)[0].max()
            if foot < horizon:  # floating above the floor: must still be nearer than the wall
                above_horizon += 1
                assert np.median(depth[inside]) < 255 - 60, stem
    assert above_horizon >= 3, "the data has no object above the horizon to check"


# --- 7. help --------------------------------------------------------------------------------


def test_every_synth_option_has_help():
    actions = [a for a in build_parser()._actions if a.dest != "help"]
    assert {"seed", "compression", "reuse_assets", "overwrite"} <= {a.dest for a in actions}
    for action in actions:
        assert action.help and len(action.help) > 10, f"{action.option_strings} has no help"
    text = run_cli("-m", "sharding.synth", "--help").stdout
    assert "random seed" in text and "deflated" in text and "--reuse-assets" in text
