"""zips -> shards: the generator, the build, its bad-input handling, and readers of the result."""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sharding.build import BuildError, ShardConfig, build
from sharding.jpeg import JpegError, decode_check, parse_header
from sharding.synth import SynthConfig, generate
from sharding.verify import VerifyError, verify
from tests.conftest import (
    EVA_ASSETS,
    ROOT,
    TINY,
    make_shards,
    one_line_error,
    run_cli,
    snapshot,
)

# --- helpers --------------------------------------------------------------------------------


def jpeg(value: int, size: int = 16, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value,) * 3).save(buf, "JPEG")
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def sample_members(f: int, b: int, flip: int = 0, n: int = 1, prefix: str = "") -> dict:
    stem = f"{f}_{b}_{flip}_{n}"
    return {
        f"{prefix}fg_bg_jpg/fg_bg_{stem}.jpg": jpeg(100),
        f"{prefix}mask_black_jpg/bg_mask_{stem}.jpg": jpeg(255),
        f"{prefix}depth_fg_bg_jpg/depth_fg_bg_{stem}.jpg": jpeg(50, 8),
    }


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def all_shard_members(shards: Path, split: str) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    for tar in sorted(shards.glob(f"{split}-*.tar")):
        members.update(tar_members(tar))
    return members


def run_build(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli("-m", "sharding.build", *args, timeout=timeout)


# --- synth ----------------------------------------------------------------------------------


def test_synth_writes_the_real_layout(tiny_zips):
    zips = sorted(p.name for p in tiny_zips.glob("*.zip"))
    assert zips == ["batch1_images.zip", "batch2_images.zip"]
    with zipfile.ZipFile(tiny_zips / "batch1_images.zip") as zf:
        names = zf.namelist()
        folders = {n.split("/")[0] for n in names}
        assert folders == {"bg_jpg", "fg_bg_jpg", "mask_black_jpg", "depth_fg_bg_jpg"}
        assert "bg_jpg/bg_img_1.jpg" in names
        assert "fg_bg_jpg/fg_bg_1_1_0_1.jpg" in names
        assert "mask_black_jpg/bg_mask_1_1_1_2.jpg" in names
        assert "depth_fg_bg_jpg/depth_fg_bg_2_4_1_2.jpg" in names
        fg_bg_count = sum(n.startswith("fg_bg_jpg/") for n in names)
        assert fg_bg_count == 2 * 4 * 2 * 2
        fg_bg = Image.open(io.BytesIO(zf.read("fg_bg_jpg/fg_bg_1_1_0_1.jpg")))
        depth = Image.open(io.BytesIO(zf.read("depth_fg_bg_jpg/depth_fg_bg_1_1_0_1.jpg")))
        mask = np.asarray(Image.open(io.BytesIO(zf.read("mask_black_jpg/bg_mask_1_1_0_1.jpg"))))
    assert fg_bg.mode == "L" and fg_bg.size == (160, 160)
    assert depth.mode == "L" and depth.size == (80, 80)
    # White object on black, blurred only a little by JPEG.
    assert (mask > 127).mean() > 0.01 and ((mask < 30) | (mask > 225)).mean() > 0.95


def test_synth_foregrounds_are_split_across_batches(tiny_zips):
    def fgs(name):
        with zipfile.ZipFile(tiny_zips / name) as zf:
            return {
                int(n.split("/")[1].split("_")[2])
                for n in zf.namelist()
                if n.startswith("fg_bg_jpg/")
            }

    assert fgs("batch1_images.zip") == {1, 2}
    assert fgs("batch2_images.zip") == {3, 4}


def test_synth_depth_is_far_bright_and_object_stands_on_floor(tiny_zips):
    with zipfile.ZipFile(tiny_zips / "batch1_images.zip") as zf:
        depth = np.asarray(
            Image.open(io.BytesIO(zf.read("depth_fg_bg_jpg/depth_fg_bg_1_2_0_1.jpg")))
        )
        mask = np.asarray(Image.open(io.BytesIO(zf.read("mask_black_jpg/bg_mask_1_2_0_1.jpg"))))
    mask_small = np.asarray(Image.fromarray(mask).resize((80, 80))) > 127
    far, near = depth[:5].mean(), depth[-5:].mean()
    assert far > near + 100  # far is bright, and the floor nears toward the bottom
    assert depth.min() <= 5 and depth.max() >= 250  # scaled per image to 0-255
    object_depth = depth[mask_small]
    assert object_depth.std() < 25  # the object sits at one depth: where it stands


def test_synth_is_deterministic_and_rgb_option(tmp_path):
    a = generate(SynthConfig(out=str(tmp_path / "a"), **TINY), progress=False)
    b = generate(SynthConfig(out=str(tmp_path / "b"), **TINY), progress=False)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    c = generate(SynthConfig(out=str(tmp_path / "c"), **{**TINY, "seed": 1}), progress=False)
    assert a[0].read_bytes() != c[0].read_bytes()
    rgb = generate(SynthConfig(out=str(tmp_path / "rgb"), rgb=True, **TINY), progress=False)
    with zipfile.ZipFile(rgb[0]) as zf:
        assert Image.open(io.BytesIO(zf.read("fg_bg_jpg/fg_bg_1_1_0_1.jpg"))).mode == "RGB"
        assert Image.open(io.BytesIO(zf.read("mask_black_jpg/bg_mask_1_1_0_1.jpg"))).mode == "L"


@pytest.mark.skipif(not EVA_ASSETS.is_dir(), reason="../shared/eva-assets not present")
def test_synth_with_real_assets(tmp_path):
    cfg = SynthConfig(out=str(tmp_path), assets=str(EVA_ASSETS), **{**TINY, "backgrounds": 2})
    (path, _) = generate(cfg, progress=False)
    with zipfile.ZipFile(path) as zf:
        bg = np.asarray(Image.open(io.BytesIO(zf.read("bg_jpg/bg_img_1.jpg"))))
    real = np.asarray(Image.open(EVA_ASSETS / "bg" / "bg001.jpg").convert("L"))
    assert np.abs(bg.astype(int) - real.astype(int)).mean() < 8  # the real photo, re-encoded


def test_synth_cli_reports_rate_and_rejects_bad_settings(tmp_path):
    ok = run_cli(
        "-m",
        "sharding.synth",
        "--out",
        str(tmp_path),
        "--batches",
        "1",
        "--backgrounds",
        "1",
        "--foregrounds",
        "1",
        "--placements",
        "1",
    )
    assert ok.returncode == 0, ok.stderr
    assert "samples/s" in ok.stdout
    bad = run_cli(
        "-m", "sharding.synth", "--out", str(tmp_path), "--batches", "3", "--foregrounds", "2"
    )
    one_line_error(bad, "--foregrounds (2) must be >= --batches (3)", code=2)  # a usage error


# --- build: round trip ----------------------------------------------------------------------


def test_round_trip_keys_counts_bytes_and_pairing(tiny_zips, tiny_shards):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 32
    assert manifest["splits"]["test"]["samples"] == 32
    assert manifest["channels"] == 1
    assert manifest["images"]["depth"]["size"] == [80, 80]
    assert manifest["skipped"]["count"] == 0
    for split, batch in (("train", 1), ("test", 2)):
        members = all_shard_members(tiny_shards, split)
        keys = {name.split(".")[0] for name in members}
        assert len(keys) == 32 and all(k.startswith(f"batch{batch}-") for k in keys)
        with zipfile.ZipFile(tiny_zips / f"batch{batch}_images.zip") as zf:
            for key in keys:
                meta = json.loads(members[f"{key}.json"])
                stem = f"{meta['fg']}_{meta['bg']}_{meta['flip']}_{meta['placement']}"
                assert key == f"batch{batch}-{stem}" and meta["zip"] == zf.filename.split("/")[-1]
                assert members[f"{key}.bg.jpg"] == zf.read(f"bg_jpg/bg_img_{meta['bg']}.jpg")
                assert members[f"{key}.fg_bg.jpg"] == zf.read(f"fg_bg_jpg/fg_bg_{stem}.jpg")
                assert members[f"{key}.mask.jpg"] == zf.read(f"mask_black_jpg/bg_mask_{stem}.jpg")
                depth = zf.read(f"depth_fg_bg_jpg/depth_fg_bg_{stem}.jpg")
                assert members[f"{key}.depth.jpg"] == depth
    for shard in manifest["splits"]["train"]["shards"]:
        assert (tiny_shards / shard["file"]).exists() and (tiny_shards / shard["index"]).exists()


def test_samples_are_shuffled_across_shards(tiny_shards):
    with tarfile.open(tiny_shards / "train-000000.tar") as tar:
        keys = [m.name.split(".")[0] for m in tar][::5]
    # In zip order the first shard would hold foreground 1 only, in ascending order.
    assert keys != sorted(keys) or len({k.split("-")[1].split("_")[0] for k in keys}) > 1


def test_index_matches_what_wds2idx_writes(tiny_shards, tmp_path):
    wds2idx = Path(sys.executable).parent / "wds2idx"
    if not wds2idx.exists():
        pytest.skip("DALI's wds2idx tool is not installed")
    out = tmp_path / "ref.idx"
    subprocess.run(
        [str(wds2idx), str(tiny_shards / "train-000000.tar"), str(out)],
        check=True,
        capture_output=True,
    )
    assert out.read_text() == (tiny_shards / "train-000000.idx").read_text()


def test_build_is_byte_identical_for_same_seed(tiny_zips, tmp_path):
    a = make_shards(tiny_zips, tmp_path / "a")
    b = make_shards(tiny_zips, tmp_path / "b", workers=2)
    files_a = sorted(p.name for p in a.iterdir())
    assert files_a == sorted(p.name for p in b.iterdir())
    for name in files_a:
        if name == "manifest.json":  # records --workers; everything else must match
            ma, mb = (json.loads((d / name).read_text()) for d in (a, b))
            ma["config"].pop("workers"), mb["config"].pop("workers")
            assert ma == mb
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = make_shards(tiny_zips, tmp_path / "c", seed=1)
    assert (a / "train-000000.tar").read_bytes() != (c / "train-000000.tar").read_bytes()


def test_verify_accepts_a_good_build_and_catches_tampering(tiny_zips, tmp_path):
    shards = make_shards(tiny_zips, tmp_path / "s")
    assert verify(shards, decode=True, progress=False) == {"train": 32, "test": 32}
    # The ok line says what was checked: with --decode, that every JPEG was decoded.
    ok = f"ok: {shards}: test 32 samples, train 32 samples"
    for flags, expected in (((), ok), (("--decode",), f"{ok} (every JPEG decoded)")):
        result = run_cli("-m", "sharding.verify", str(shards), *flags)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected
    tar = shards / "test-000001.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=r"test-000001\.tar: sha256"):
        verify(shards, progress=False)
    result = run_cli("-m", "sharding.verify", str(shards))
    one_line_error(result, "test-000001.tar", "sha256")
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    (shards / "train-000002.idx").unlink()
    one_line_error(run_cli("-m", "sharding.verify", str(shards)), "train-000002.idx", "missing")


# --- readers of the shards: real DALI and the webdataset library ----------------------------


def test_dali_cpu_reads_every_sample_through_the_indexes(tiny_shards):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn

    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]

    @dali.pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def read():
        bg, fg_bg, mask, depth, meta = fn.readers.webdataset(
            paths=[str(tiny_shards / s["file"]) for s in shards],
            index_paths=[str(tiny_shards / s["index"]) for s in shards],
            ext=["bg.jpg", "fg_bg.jpg", "mask.jpg", "depth.jpg", "json"],
            missing_component_behavior="error",
            name="Reader",
        )
        images = [
            fn.decoders.image(x, device="cpu", output_type=dali.types.GRAY)
            for x in (bg, fg_bg, mask, depth)
        ]
        return (*images, meta)

    pipe = read()
    pipe.build()
    assert pipe.epoch_size("Reader") == 32
    seen = []
    for _ in range(4):
        bg, _fg_bg, _mask, depth, meta = pipe.run()
        assert np.array(bg[0]).shape == (160, 160, 1)
        assert np.array(depth[0]).shape == (80, 80, 1)
        seen += [json.loads(bytes(np.array(meta[i]))) for i in range(len(meta))]
    assert len({(m["fg"], m["bg"], m["flip"], m["placement"]) for m in seen}) == 32


def test_webdataset_library_reads_the_shards(tiny_shards):
    wds = pytest.importorskip("webdataset")
    urls = str(tiny_shards / "test-{000000..000003}.tar")
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 32
    first = samples[0]
    assert set(first) >= {"__key__", "bg.jpg", "fg_bg.jpg", "mask.jpg", "depth.jpg", "json"}
    assert first["depth.jpg"].size == (80, 80)
    assert first["json"]["zip"] == "batch2_images.zip"


# --- naming variants and junk ---------------------------------------------------------------


def test_variants_nested_folders_extras_and_junk_are_handled(tmp_path):
    members = {
        "batch3/bg_jpg/bg_3.jpg": jpeg(80),  # variant bg name, nested under one folder
        "batch3/fg_jpg/fg_1.jpg": jpeg(10),  # extra folder real zips carry
        "batch3/mask_jpg/mask_1.jpg": jpeg(10),
        "__MACOSX/batch3/._bg_3.jpg": b"junk",
        "batch3/.DS_Store": b"junk",
        "batch3/fg_bg_jpg/fg_bg_1_3_0_1.jpg": jpeg(100),
        "batch3/mask_black_jpg/bg_mask_1_3_0_1.jpg": jpeg(255),
        "batch3/depth_fg_bg_jpg/depth_1_3_0_1.jpg": jpeg(50, 8),  # variant depth name
    }
    zips = [write_zip(tmp_path / "batch3_images.zip", members)]
    zips.append(
        write_zip(
            tmp_path / "batch4_images.zip",
            {"bg_jpg/bg_img_1.jpg": jpeg(1), **sample_members(2, 1)},
            zipfile.ZIP_DEFLATED,  # compressed members go through zipfile, not the memory map
        )
    )
    manifest = build(ShardConfig(zips=tuple(map(str, zips)), out=str(tmp_path / "o")), False)
    assert manifest["splits"]["train"]["samples"] == 1
    assert manifest["splits"]["test"]["samples"] == 1
    assert manifest["ignored"]["junk"] == 2 and manifest["ignored"]["extra"] == 2
    members_out = all_shard_members(tmp_path / "o", "train")
    assert members_out["batch3-1_3_0_1.bg.jpg"] == members["batch3/bg_jpg/bg_3.jpg"]
    test_members = all_shard_members(tmp_path / "o", "test")
    assert (
        test_members["batch4-2_1_0_1.fg_bg.jpg"]
        == sample_members(2, 1)["fg_bg_jpg/fg_bg_2_1_0_1.jpg"]
    )
    assert (
        members_out["batch3-1_3_0_1.depth.jpg"]
        == members["batch3/depth_fg_bg_jpg/depth_1_3_0_1.jpg"]
    )


# --- bad input: samples are skipped and counted ---------------------------------------------


def broken_zip(tmp_path: Path) -> list[str]:
    """batch1 holds one good sample and four broken ones; batch2 is a good test batch."""
    good = {"bg_jpg/bg_img_1.jpg": jpeg(80), **sample_members(1, 1)}
    corrupt = sample_members(1, 1, n=2)
    corrupt["fg_bg_jpg/fg_bg_1_1_0_2.jpg"] = jpeg(100)[:200]  # truncated: no end marker
    no_mask = sample_members(1, 1, n=3)
    del no_mask["mask_black_jpg/bg_mask_1_1_0_3.jpg"]
    no_bg = sample_members(1, 9, n=1)  # background 9 does not exist
    bad_name = {"fg_bg_jpg/fg_bg_1_1_x_1.jpg": jpeg(100)}
    z1 = write_zip(
        tmp_path / "batch1_images.zip", {**good, **corrupt, **no_mask, **no_bg, **bad_name}
    )
    z2 = write_zip(
        tmp_path / "batch2_images.zip", {"bg_jpg/bg_img_1.jpg": jpeg(1), **sample_members(5, 1)}
    )
    return [str(z1), str(z2)]


def test_broken_samples_are_skipped_and_counted(tmp_path):
    zips = broken_zip(tmp_path)
    result = run_build(*zips, "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 1
    assert manifest["skipped"]["count"] == 4
    assert manifest["skipped"]["by_reason"] == {
        "bad_name": 1,
        "corrupt_fg_bg": 1,
        "missing_bg": 1,
        "missing_mask": 1,
    }
    reasons = {s["member"]: s["reason"] for s in manifest["skipped"]["samples"]}
    assert reasons["fg_bg_jpg/fg_bg_1_1_0_2.jpg"] == "corrupt_fg_bg"
    assert all(s["zip"] == "batch1_images.zip" for s in manifest["skipped"]["samples"])
    assert "skipped 4 samples" in result.stdout


def test_strict_makes_any_skip_fatal(tmp_path):
    zips = broken_zip(tmp_path)
    result = run_build(*zips, "--out", str(tmp_path / "o"), "--strict")
    one_line_error(result, "--strict", "batch1_images.zip")
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_corrupt_jpeg_that_only_a_full_decode_catches(tmp_path):
    good = jpeg(100)  # the dataset's size here: 16x16, like the other parts
    # Drop the quantisation table: markers and frame header stay intact, decoding cannot work.
    dqt = good.find(b"\xff\xdb")
    damaged = good[:dqt] + good[dqt + 2 + int.from_bytes(good[dqt + 2 : dqt + 4], "big") :]
    parse_header(damaged)  # the cheap check passes...
    with pytest.raises(JpegError):
        decode_check(damaged)  # ...a full decode does not
    members = {"bg_jpg/bg_img_1.jpg": jpeg(80), **sample_members(1, 1), **sample_members(2, 1)}
    members["fg_bg_jpg/fg_bg_2_1_0_1.jpg"] = damaged
    z1 = write_zip(tmp_path / "batch1_images.zip", members)
    z2 = write_zip(
        tmp_path / "batch2_images.zip", {"bg_jpg/bg_img_1.jpg": jpeg(1), **sample_members(5, 1)}
    )
    zips = (str(z1), str(z2))
    header_only = build(ShardConfig(zips=zips, out=str(tmp_path / "h")), progress=False)
    assert header_only["skipped"]["count"] == 0
    decoded = build(ShardConfig(zips=zips, out=str(tmp_path / "d"), verify="decode"), False)
    assert decoded["skipped"]["by_reason"] == {"corrupt_fg_bg": 1}


# --- bad input: fatal, one line, nothing left -------------------------------------------------


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: p.write_text("hello, not a zip"), "not a zip file"),
        (lambda p: p.write_bytes(zipfile_bytes()[:300]), "truncated or damaged zip"),
        (lambda p: write_zip(p, {"photos/cat.jpg": jpeg(1)}), "none of the expected folders"),
        (lambda p: None, "no such file"),
    ],
    ids=["not-a-zip", "truncated", "no-folders", "missing"],
)
def test_bad_zip_gives_one_line_error_and_no_output(tmp_path, tiny_zips, make, fragment):
    bad = tmp_path / "batch9_images.zip"
    make(bad)
    out = tmp_path / "out"
    result = run_build(str(tiny_zips / "batch1_images.zip"), str(bad), "--out", str(out))
    one_line_error(result, str(bad), fragment)
    assert not out.exists()  # input is checked before anything is written


def zipfile_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in {"bg_jpg/bg_img_1.jpg": jpeg(1, 64), **sample_members(1, 1)}.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_non_empty_out_is_refused_unless_overwrite(tiny_zips, tmp_path):
    zips = [str(p) for p in sorted(tiny_zips.glob("*.zip"))]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_build(*zips, "--out", str(out))
    one_line_error(result, "not empty", "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"  # nothing of the user's is lost
    out2 = tmp_path / "out2"
    assert run_build(*zips, "--out", str(out2), "--samples-per-shard", "8").returncode == 0
    again = run_build(*zips, "--out", str(out2))
    one_line_error(again, "not empty")
    redo = run_build(*zips, "--out", str(out2), "--overwrite", "--samples-per-shard", "16")
    assert redo.returncode == 0, redo.stderr
    assert len(list(out2.glob("train-*.tar"))) == 2  # the old 4-shard build is fully replaced


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_closed_stdout_ends_the_build_quietly(tiny_zips, tmp_path, unbuffered):
    """`sharding.build ... | head -3`: a reader that has gone is no traceback, and the build stands.

    The reader closes the pipe before the build writes a line, so every write to stdout fails:
    at a print (unbuffered) or at the flush on exit (buffered, as into a pipe by default).
    """
    zips = [str(p) for p in sorted(tiny_zips.glob("*.zip"))]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    build_cmd = [sys.executable, "-m", "sharding.build", *zips, "--out", str(out)]
    proc = subprocess.Popen(
        build_cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 1, stderr
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr, stderr
    assert "Exception ignored" not in stderr, stderr
    assert verify(out, progress=False) == {"train": 32, "test": 32}  # the build itself finished


def start_build_and_wait_for_first_shard(tmp_path: Path) -> tuple[subprocess.Popen, Path, list]:
    """Start a build slow enough to interrupt; return once its first temporary shard exists."""
    cfg = SynthConfig(
        out=str(tmp_path / "z"), batches=2, backgrounds=8, foregrounds=4, placements=8
    )
    zips = generate(cfg, progress=False)
    out = tmp_path / "out"
    args = [*map(str, zips), "--out", str(out), "--samples-per-shard", "4", "--workers", "1"]
    args += ["--verify", "decode"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sharding.build", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob(".tmp-*")):
        time.sleep(0.005)
    assert proc.poll() is None, "the build finished before it could be interrupted"
    return proc, out, args


def test_killed_build_leaves_no_manifest_and_rerun_succeeds(tmp_path):
    proc, out, args = start_build_and_wait_for_first_shard(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (out / "manifest.json").exists()
    rerun = run_build(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert verify(out, progress=False)["train"] == 256
    assert not list(out.glob(".tmp-*"))


def test_sigterm_cleans_up_temporary_files(tmp_path):
    proc, out, _ = start_build_and_wait_for_first_shard(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not (out / "manifest.json").exists() and not list(out.glob(".tmp-*"))


def test_full_disk_gives_one_line_error_and_no_manifest(tiny_zips, tmp_path):
    zips = [str(p) for p in sorted(tiny_zips.glob("*.zip"))]
    out = tmp_path / "out"

    def small_file_limit():  # writes past 64 KiB fail, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sharding.build",
            *zips,
            "--out",
            str(out),
            "--samples-per-shard",
            "16",
            "--workers",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=small_file_limit,
        timeout=120,
    )
    one_line_error(result, "write failed")
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".tmp-*"))
    assert run_build(*zips, "--out", str(out)).returncode == 0  # and a re-run just works


def test_a_directory_stands_for_its_batch_zips(tiny_zips, tmp_path):
    zips = [str(p) for p in sorted(tiny_zips.glob("*.zip"))]
    by_name, by_dir = tmp_path / "by-name", tmp_path / "by-dir"
    assert run_build(*zips, "--out", str(by_name), "--samples-per-shard", "8").returncode == 0
    result = run_build(str(tiny_zips), "--out", str(by_dir), "--samples-per-shard", "8")
    assert result.returncode == 0, result.stderr
    assert snapshot(by_dir) == snapshot(by_name)  # the same zips, the same bytes

    # Ordered by batch number as named zips are (batch10 after batch2: the test split).
    folder = tmp_path / "zips"
    folder.mkdir()
    (folder / "batch2_images.zip").write_bytes((tiny_zips / "batch1_images.zip").read_bytes())
    (folder / "batch10_images.zip").write_bytes((tiny_zips / "batch2_images.zip").read_bytes())
    (folder / "notes.zip").write_bytes(b"not a batch zip, not read")
    manifest = build(ShardConfig(zips=(str(folder),), out=str(tmp_path / "numbered")), False)
    assert manifest["sources"] == ["batch2_images.zip", "batch10_images.zip"]
    test_keys = all_shard_members(tmp_path / "numbered", "test")
    assert test_keys and all(name.startswith("batch10") for name in test_keys)

    # A directory with no batch zip in it: one line naming it, nothing written.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "batch1.zip").write_bytes(b"not named batch*_images.zip")
    before = snapshot(tmp_path)
    result = run_build(str(empty), "--out", str(tmp_path / "out"))
    one_line_error(result, str(empty), "batch*_images.zip")
    assert result.returncode == 1
    assert snapshot(tmp_path) == before


def test_test_zips_option_and_errors(tiny_zips, tmp_path):
    zips = tuple(str(p) for p in sorted(tiny_zips.glob("*.zip")))
    m = build(ShardConfig(zips=zips, out=str(tmp_path / "a"), test_zips=("batch1",)), False)
    test_keys = all_shard_members(tmp_path / "a", "test")
    assert m["splits"]["test"]["samples"] == 32
    assert all(k.startswith("batch1-") for k in test_keys)
    with pytest.raises(BuildError, match="--test-zips batch7: not among the input zips"):
        build(ShardConfig(zips=zips, out=str(tmp_path / "b"), test_zips=("batch7",)), False)


def test_build_help_explains_itself():
    result = run_cli("-m", "sharding.build", "--help")
    assert result.returncode == 0
    for option in (
        "--out",
        "--test-zips",
        "--samples-per-shard",
        "--workers",
        "--verify",
        "--strict",
        "--overwrite",
    ):
        assert option in result.stdout


def test_sharding_does_not_import_torch():
    code = (
        "import sys, sharding.build, sharding.synth, sharding.verify; print('torch' in sys.modules)"
    )
    result = run_cli("-c", code)
    assert result.stdout.strip() == "False", result.stderr


def test_shard_vs_unzip_benchmark_runs_on_tiny_zips(tiny_zips, tmp_path):
    out = tmp_path / "bench.json"
    zips = [str(p) for p in sorted(tiny_zips.glob("*.zip"))]
    result = run_cli("-m", "benchmarks.shard_vs_unzip", *zips, "--json", str(out), "--workers", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["samples"] == 64
    assert report["unzip"]["seconds"] > 0 and report["build"]["seconds"] > 0
    assert "build / unzip" in result.stdout


def test_default_synth_config_is_the_full_400k_layout(tmp_path):
    cfg = SynthConfig(out=str(tmp_path))
    assert cfg.samples_per_batch == [40_000] * 10
    assert [len(fgs) for fgs in cfg.fg_split()] == [10] * 10
    assert sorted(f for fgs in cfg.fg_split() for f in fgs) == list(range(1, 101))
