"""benchmarks.quality on tiny data: it runs end to end and its floor is computed in grey levels.

The benchmark needs real photos (shared/eva-assets); these tests write a few stand-ins in
``tmp_path`` in the same layout, so they run, and keep the benchmark from rotting, anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import EVA_ASSETS, run_cli

TINY_BENCH = ("--backgrounds", "4", "--foregrounds", "3", "--epochs", "1", "--batch-size", "4")
TINY_TRAIN = ("--", "--widths", "4,8,16", "--max-batches", "2")


@pytest.fixture(scope="module")
def stand_in_assets(tmp_path_factory):
    """``bg/*.jpg`` (smooth grey ramps) and ``fg/*.png`` (RGBA blobs far from their grey)."""
    root = tmp_path_factory.mktemp("assets")
    (root / "bg").mkdir()
    (root / "fg").mkdir()
    rng = np.random.default_rng(0)
    ramp = np.linspace(60, 140, 160)
    for i in range(4):
        bg = np.broadcast_to((ramp[None, :, None] + 10 * i), (160, 160, 3)).astype(np.uint8)
        Image.fromarray(bg).save(root / "bg" / f"bg{i:03}.jpg")
    yy, xx = np.mgrid[0:80, 0:40]
    for i in range(6):
        alpha = (((yy - 40) / 38) ** 2 + ((xx - 20) / 18) ** 2 <= 1) * 255
        rgb = np.full((80, 40, 3), 230 if i % 2 else 10) + rng.integers(0, 5, (80, 40, 3))
        fg = np.dstack([rgb, alpha]).astype(np.uint8)
        Image.fromarray(fg, "RGBA").save(root / "fg" / f"fg{i:03}.png")
    return root


def test_benchmark_runs_end_to_end_and_writes_json(stand_in_assets, tmp_path):
    out = tmp_path / "quality.json"
    result = run_cli(
        "-m",
        "benchmarks.quality",
        "--assets",
        str(stand_in_assets),
        "--json",
        str(out),
        *TINY_BENCH,
        "--placements",
        "2",
        "--repeat",
        "2",
        *TINY_TRAIN,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(out.read_text())
    # 1 fg x 4 bgs x 2 flips x 2 placements per batch
    assert payload["samples"] == {"train": 32, "test": 16}
    assert set(payload["test"]) == {"iou", "dice", "depth_ssim", "depth_rmse", "depth_mae"}
    # --repeat 2: seeds 0 and 1 on the same data, the goals judged on the means.
    runs = payload["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert runs[0]["test"] != runs[1]["test"]  # another seed, another model
    for key, mean in payload["test"].items():
        values = [r["test"][key] for r in runs]
        assert mean == pytest.approx(sum(values) / 2)
        assert payload["test_range"][key] == [min(values), max(values)]
    assert payload["train_s"] == pytest.approx((runs[0]["train_s"] + runs[1]["train_s"]) / 2)
    assert "seed 1: IoU" in result.stdout and "mean of 2 seeds" in result.stdout
    assert 0 < payload["params"] < 750_000 and payload["train_wall_s"] > 0
    # Objects 70+ grey levels off their background: a floor computed in the loader's
    # normalised units instead of grey levels would miss them or flag the whole frame.
    assert payload["pixel_difference_floor"]["iou"] > 0.8
    assert payload["goals_met"]["params"] is True
    # Training time is train.py's own (steps + data wait, evaluation apart), below its wall.
    assert 0 < payload["train_s"] < payload["train_wall_s"]
    assert payload["eval_s"] > 0 and payload["goals_met"]["train_s"] is True
    # Without --work the runs lived in a temporary directory, now gone: the last line says so
    # after the paths train.py printed into it, and names where the results are.
    lines = result.stdout.strip().splitlines()
    printed = [line.split()[-1] for line in lines if line.startswith("metrics:")]
    assert len(printed) == 2, result.stdout
    removed = lines[-1].split("removed the work directory ", 1)[-1].split(" ", 1)[0]
    assert lines[-1].startswith(f"removed the work directory {removed} ")
    assert all(path.startswith(f"{removed}/") for path in printed), (removed, printed)
    assert not Path(removed).exists() and f"the results are in {out};" in lines[-1]
    assert "pixel-difference floor" in result.stdout and "IoU" in result.stdout


def test_sweep_trains_one_point_per_foreground_count(stand_in_assets, tmp_path):
    out = tmp_path / "sweep.json"
    result = run_cli(
        "-m", "benchmarks.quality", "--assets", str(stand_in_assets), "--json", str(out),
        "--sweep", "3,6", "--sweep-samples", "16", "--epochs", "1", "--batch-size", "4",
        *TINY_TRAIN, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(out.read_text())
    points = payload["points"]
    assert [p["config"]["foregrounds"] for p in points] == [3, 6]
    # 3: one training foreground per batch on 4 backgrounds; 6: two per batch on 2.
    assert [p["config"]["backgrounds"] for p in points] == [4, 2]
    assert [p["samples"] for p in points] == [{"train": 16, "test": 8}, {"train": 16, "test": 8}]
    for point in points:
        iou, floor = point["test"]["iou"], point["pixel_difference_floor"]["iou"]
        met = point["sweep_goals_met"]
        assert met["above_floor"] == (iou >= floor + 0.03)
        assert met["iou_where_floor_high"] == (floor < 0.85 or iou >= 0.90)
    assert payload["goals_met"] == all(all(p["sweep_goals_met"].values()) for p in points)
    rows = [line for line in result.stdout.splitlines() if line[:4].strip() in ("3", "6")]
    assert len(rows) == 2 and "floor IoU" in result.stdout, result.stdout


def test_bad_sweep_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "sweep.json"
    out.write_text("kept")
    result = run_cli("-m", "benchmarks.quality", "--sweep", "2,20", "--json", str(out))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("'2,20': each point needs at least 3 foregrounds (2 batches train, 1 tests)")
    )
    assert out.read_text() == "kept"


def test_missing_assets_is_one_line_and_exit_1(tmp_path):
    result = run_cli("-m", "benchmarks.quality", "--assets", str(tmp_path / "none"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "no assets at" in result.stderr and "--assets" in result.stderr


@pytest.mark.skipif(not EVA_ASSETS.is_dir(), reason="shared/eva-assets is not beside the repo")
def test_floor_on_the_real_photos_is_far_from_trivial(tmp_path):
    result = run_cli(
        "-m", "benchmarks.quality", "--json", str(tmp_path / "q.json"), *TINY_BENCH, *TINY_TRAIN,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    floor = json.loads((tmp_path / "q.json").read_text())["pixel_difference_floor"]
    assert 0.3 < floor["iou"] < 1.0
