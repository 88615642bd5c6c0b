"""sharding.shard_format: index and manifest formats, and the geometry loader and model share."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest

from model import UNet, UNetConfig
from pipeline import LoaderConfig, build_loader
from sharding.shard_format import (
    GEOMETRY,
    MANIFEST,
    MEMBER_EXTS,
    Geometry,
    IndexFormatError,
    ManifestError,
    format_index,
    index_data_end,
    member_name,
    parse_index,
    read_manifest,
    split_member,
    write_manifest,
)

# --- the DALI index -------------------------------------------------------------------------


def test_index_lists_every_member_where_the_tar_has_it(tiny_shards):
    samples = parse_index((tiny_shards / "train-000000.idx").read_text())
    with tarfile.open(tiny_shards / "train-000000.tar") as tar:
        members = {m.name: m for m in tar}
    assert len(samples) == len({split_member(name)[0] for name in members})
    for entries in samples:
        assert tuple(ext for ext, *_ in entries) == MEMBER_EXTS
        for ext, offset, size, name in entries:
            assert split_member(name)[1] == ext
            assert (members[name].offset_data, members[name].size) == (offset, size)
    assert index_data_end(samples) <= (tiny_shards / "train-000000.tar").stat().st_size


def test_index_round_trip_and_the_older_format():
    samples = [[("bg.jpg", 512, 700, "k1.bg.jpg"), ("json", 1536, 40, "k1.json")]]
    text = format_index(samples)
    assert text == "v1.2 1\nbg.jpg 512 700 k1.bg.jpg json 1536 40 k1.json\n"
    assert parse_index(text) == samples
    # wds2idx before DALI 1.x wrote no member names; the loader still reads those.
    assert parse_index("v1.1 1\nbg.jpg 512 700 json 1536 40\n") == [
        [("bg.jpg", 512, 700, None), ("json", 1536, 40, None)]
    ]
    assert index_data_end(parse_index(text)) == 1576


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty index"),
        ("v9 1\nbg.jpg 0 1 k.bg.jpg\n", "bad index header"),
        ("v1.2 1\nbg.jpg 0 1\n", "bad index line"),
        ("v1.2 1\nbg.jpg zero 1 k.bg.jpg\n", "bad index line"),
        ("v1.2 2\nbg.jpg 0 1 k.bg.jpg\n", "says 2 samples but lists 1"),
    ],
)
def test_malformed_index_is_refused(text, match):
    with pytest.raises(IndexFormatError, match=match):
        parse_index(text)


def test_member_names_refuse_keys_that_would_split_wrongly():
    assert member_name("batch1-1_2_0_3", "fg_bg.jpg") == "batch1-1_2_0_3.fg_bg.jpg"
    assert split_member("batch1-1_2_0_3.fg_bg.jpg") == ("batch1-1_2_0_3", "fg_bg.jpg")
    for key in ("a.b", "a/b", ""):
        with pytest.raises(ValueError, match="sample key"):
            member_name(key, "json")


# --- the manifest ---------------------------------------------------------------------------


def test_manifest_written_again_is_byte_identical(tiny_shards, tmp_path):
    manifest = read_manifest(tiny_shards)
    assert set(manifest["splits"]) == {"train", "test"}
    write_manifest(tmp_path, manifest)
    assert (tmp_path / MANIFEST).read_bytes() == (tiny_shards / MANIFEST).read_bytes()


def _edit_manifest(manifest: dict, problem: str) -> str | dict:
    if problem == "not json":
        return "{ not json"
    if problem == "other version":
        return {**manifest, "format_version": 99}
    if problem == "no channels":
        return {k: v for k, v in manifest.items() if k != "channels"}
    if problem == "shard without sha256":
        del manifest["splits"]["train"]["shards"][1]["sha256"]
        return manifest
    raise AssertionError(problem)


@pytest.mark.parametrize(
    ("problem", "match"),
    [
        ("not json", "unreadable manifest"),
        ("other version", "version 99, expected 'maskdepth-shards' version 1"),
        ("no channels", "channels is None, expected 1 or 3"),
        ("shard without sha256", r"splits\.train\.shards\[1\] lacks 'sha256'"),
    ],
)
def test_bad_manifest_names_its_path_and_problem(tiny_shards, tmp_path, problem, match):
    data = tmp_path / "shards"
    shutil.copytree(tiny_shards, data)
    edited = _edit_manifest(json.loads((data / MANIFEST).read_text()), problem)
    (data / MANIFEST).write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(ManifestError, match=match) as caught:
        read_manifest(data)
    assert str(caught.value).startswith(f"{data / MANIFEST}: ")


def test_missing_manifest_or_directory_is_named(tmp_path):
    with pytest.raises(ManifestError, match="no such directory") as caught:
        read_manifest(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(caught.value)
    with pytest.raises(ManifestError, match=r"manifest\.json: not found"):
        read_manifest(tmp_path)


# --- geometry -------------------------------------------------------------------------------


def test_loader_and_model_default_to_the_dataset_geometry():
    assert (GEOMETRY.image_size, GEOMETRY.depth_size) == (160, 80)  # the EVA dataset's
    assert LoaderConfig().geometry == UNetConfig().geometry == GEOMETRY
    with pytest.raises(ValueError, match="depth_size=0"):
        Geometry(160, 0)


def test_model_built_for_a_loader_geometry_matches_its_batches(tiny_shards):
    cfg = LoaderConfig(backend="torch", batch_size=4, num_threads=0, image_size=64, depth_size=32)
    loader = build_loader(tiny_shards, "test", cfg)
    batch = next(iter(loader.epoch(0)))
    unet_cfg = UNetConfig.for_geometry(cfg.geometry, in_channels=loader.channels, widths=(4, 8))
    assert (unet_cfg.mask_size, unet_cfg.depth_size, unet_cfg.geometry) == (64, 32, cfg.geometry)
    mask_logits, depth = UNet(unet_cfg).eval()(UNet.input_from(batch["bg"], batch["fg_bg"]))
    assert mask_logits.shape == batch["mask"].shape == (4, 1, 64, 64)
    assert depth.shape == batch["depth"].shape == (4, 1, 32, 32)
