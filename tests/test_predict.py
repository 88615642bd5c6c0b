"""predict.py: output sizes for gray and colour inputs of any size, folder mode, bad input."""

from __future__ import annotations

import tarfile
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import train
from model import MaskDepthLoss, UNet, UNetConfig
from pipeline import build_loader
from tests.conftest import omp_policy_when_torch_loads, run_cli, snapshot
from training.checkpoint import TrainState, save_checkpoint
from training.recipe import build_optimizer


def make_checkpoint(path, channels: int) -> UNet:
    """A checkpoint in train.py's format for a small random UNet; returns the model."""
    torch.manual_seed(channels)
    cfg = train.TrainConfig(data="unused", widths=(4, 8, 16))
    unet_cfg = UNetConfig(in_channels=channels, widths=cfg.widths)
    model = UNet(unet_cfg).eval()
    optimizer, scheduler = build_optimizer(cfg, model)
    loader_cfg = predict.LoaderConfig()
    loss_fn = MaskDepthLoss()
    config = asdict(cfg)
    state = TrainState(model, model, loss_fn, optimizer, scheduler, unet_cfg, loader_cfg, config)
    save_checkpoint(state.state_dict(), path)
    return model


def write_image(path, size: tuple[int, int], mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


def expected_masks(model: UNet, bg_path, fg_bg_path) -> tuple[np.ndarray, np.ndarray]:
    """The masks predict.py should write (model's size, input's size), from the model directly."""
    mode = "L" if model.cfg.in_channels == 1 else "RGB"

    def load(path):
        with Image.open(path) as image:
            image = image.convert(mode).resize((160, 160), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32).reshape(160, 160, -1) / 255.0
        return (torch.from_numpy(array).permute(2, 0, 1)[None] - 0.5) / 0.25

    with torch.no_grad():
        mask_logits, _ = model(torch.cat([load(bg_path), load(fg_bg_path)], dim=1))
    prob = torch.sigmoid(mask_logits)
    with Image.open(fg_bg_path) as image:
        width, height = image.size
    full = torch.nn.functional.interpolate(prob, size=(height, width), mode="bilinear")
    as_png = [(m[0, 0] > 0.5).numpy().astype(np.uint8) * 255 for m in (prob, full)]
    return as_png[0], as_png[1]


@pytest.mark.parametrize(
    ("channels", "mode", "size"), [(1, "RGB", (200, 120)), (3, "L", (50, 70)), (1, "L", (96, 96))]
)
def test_single_pair_writes_outputs_at_input_and_model_size(tmp_path, capsys, channels, mode, size):
    model = make_checkpoint(tmp_path / "model.pt", channels)
    bg, fg_bg = tmp_path / "bg.jpg", tmp_path / "fg_bg_1_2_0_3.jpg"
    write_image(bg, size, mode, seed=1)
    write_image(fg_bg, size, mode, seed=2)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tmp_path / "model.pt"), "--bg", str(bg), "--fg-bg", str(fg_bg)]
    assert predict.main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    model_mask, input_mask = expected_masks(model, bg, fg_bg)
    stem = out / "fg_bg_1_2_0_3"
    with Image.open(f"{stem}_mask_160.png") as mask:
        assert mask.size == (160, 160) and mask.mode == "L"
        np.testing.assert_array_equal(np.asarray(mask), model_mask)
    with Image.open(f"{stem}_depth_80.png") as depth:
        assert depth.size == (80, 80) and depth.mode == "L"
    # At the input's size, to lay over the photo.
    with Image.open(f"{stem}_mask.png") as mask:
        assert mask.size == size and mask.mode == "L"
        np.testing.assert_array_equal(np.asarray(mask), input_mask)
    with Image.open(f"{stem}_depth.png") as depth:
        assert depth.size == size and depth.mode == "L"
    with Image.open(f"{stem}_figure.png") as figure:
        assert figure.width >= 4 * 160 and figure.height >= 160
    notes = [line for line in capsys.readouterr().out.splitlines() if "aspect ratio" in line]
    if size[0] == size[1]:
        assert notes == []
    else:
        assert len(notes) == 1 and f"{size[0]}x{size[1]}" in notes[0] and "160x160" in notes[0]


def test_inputs_are_prepared_exactly_as_the_test_loader_prepares_them(tiny_shards, tmp_path):
    """predict.py and the torch loader share one decode/resize/normalise: identical tensors."""
    loader_cfg = predict.LoaderConfig(backend="torch", batch_size=2, num_threads=0)
    batch = next(iter(build_loader(str(tiny_shards), "test", loader_cfg).epoch(0)))
    for i, key in enumerate(batch["key"]):
        for part in ("bg", "fg_bg"):
            path = tmp_path / f"{key}.{part}.jpg"
            for shard in sorted(tiny_shards.glob("test-*.tar")):
                with tarfile.open(shard) as tar:
                    if path.name in tar.getnames():
                        path.write_bytes(tar.extractfile(path.name).read())
            prepared = predict.read_images([path], 1, 160, loader_cfg)
            assert torch.equal(prepared[0], batch[part][i]), (key, part)


def test_folders_are_paired_by_dataset_names(tmp_path, capsys):
    make_checkpoint(tmp_path / "model.pt", 1)
    bg_dir, fg_bg_dir = tmp_path / "bg_jpg", tmp_path / "fg_bg_jpg"
    bg_dir.mkdir(), fg_bg_dir.mkdir()
    for b in (1, 2):
        write_image(bg_dir / f"bg_img_{b}.jpg", (160, 160), "L", seed=b)
    stems = ["fg_bg_1_1_0_1", "fg_bg_2_2_1_3", "fg_bg_3_2_0_2"]
    for i, stem in enumerate(stems):
        write_image(fg_bg_dir / f"{stem}.jpg", (160, 160), "L", seed=10 + i)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tmp_path / "model.pt"), "--bg-dir", str(bg_dir)]
    argv += ["--fg-bg-dir", str(fg_bg_dir), "--out", str(out), "--batch-size", "2"]
    assert predict.main(argv) == 0
    assert "wrote 3 prediction(s)" in capsys.readouterr().out
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        f"{s}_{kind}.png"
        for s in stems
        for kind in ("mask", "depth", "mask_160", "depth_80", "figure")
    )

    (bg_dir / "bg_img_2.jpg").unlink()
    assert predict.main(argv) == 1
    assert "no bg_img_{b}.jpg" in capsys.readouterr().err


def test_bad_input_is_one_line_error(tmp_path):
    make_checkpoint(tmp_path / "model.pt", 1)
    write_image(tmp_path / "bg.jpg", (160, 160), "L", seed=1)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    cases = [
        (
            ["--bg", str(tmp_path / "bg.jpg"), "--fg-bg", str(tmp_path / "nope.jpg")],
            "does not exist",
        ),
        (
            ["--bg", str(tmp_path / "bg.jpg"), "--fg-bg", str(tmp_path / "broken.jpg")],
            "cannot read",
        ),
    ]
    for args, match in cases:
        result = run_cli(
            "predict.py",
            "--checkpoint",
            str(tmp_path / "model.pt"),
            *args,
            "--out",
            str(tmp_path / "out"),
        )
        assert result.returncode == 1, result.stdout
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and match in lines[0], result.stderr


def test_half_a_pair_is_a_usage_error(tmp_path):
    """--bg without --fg-bg, and the like: exit 2 with argparse's error line, nothing written."""
    make_checkpoint(tmp_path / "model.pt", 1)
    write_image(tmp_path / "bg.jpg", (160, 160), "L", seed=1)
    image, folder = str(tmp_path / "bg.jpg"), str(tmp_path)
    cases = [
        (["--bg", image], "--bg goes with --fg-bg"),
        (["--fg-bg", image], "--bg goes with --fg-bg"),
        (["--bg-dir", folder], "--bg-dir with --fg-bg-dir"),
        ([], "give either --bg and --fg-bg, or --bg-dir and --fg-bg-dir"),
        (["--bg", image, "--fg-bg", image, "--bg-dir", folder], "give either"),
        (["--bg", image, "--fg-bg", image, "--batch-size", "0"], "--batch-size 0 must be"),
    ]
    before = snapshot(tmp_path)
    for args, match in cases:
        argv = ["--checkpoint", str(tmp_path / "model.pt"), *args, "--out", str(tmp_path / "out")]
        result = run_cli("predict.py", *argv)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert errors == [result.stderr.strip().splitlines()[-1]], result.stderr
        assert errors[0].startswith("predict.py: error: ") and match in errors[0], result.stderr
        assert snapshot(tmp_path) == before


def test_missing_or_foreign_checkpoint_is_refused(tmp_path, capsys):
    write_image(tmp_path / "bg.jpg", (160, 160), "L", seed=1)
    pair = ["--bg", str(tmp_path / "bg.jpg"), "--fg-bg", str(tmp_path / "bg.jpg")]
    out = ["--out", str(tmp_path / "out")]
    assert predict.main(["--checkpoint", str(tmp_path / "none.pt"), *pair, *out]) == 1
    assert "does not exist" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert predict.main(["--checkpoint", str(tmp_path / "foreign.pt"), *pair, *out]) == 1
    assert "not a maskdepth checkpoint" in capsys.readouterr().err


def assert_refused(tmp_path, capsys, argv, match: str) -> None:
    """predict.py exits 1 with one line naming ``match``, and the file system is untouched."""
    before = snapshot(tmp_path)
    assert predict.main([*argv, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], lines
    assert snapshot(tmp_path) == before


def test_pair_of_different_sizes_is_refused(tmp_path, capsys):
    make_checkpoint(tmp_path / "model.pt", 1)
    write_image(tmp_path / "bg.jpg", (640, 480), "RGB", seed=1)
    write_image(tmp_path / "fg_bg.jpg", (320, 240), "RGB", seed=2)
    argv = ["--checkpoint", str(tmp_path / "model.pt")]
    pair = ["--bg", str(tmp_path / "bg.jpg"), "--fg-bg", str(tmp_path / "fg_bg.jpg")]
    assert_refused(tmp_path, capsys, [*argv, *pair], "is 640x480 but")

    # In folder mode the check runs before any pair is written, even with the odd one last.
    bg_dir, fg_bg_dir = tmp_path / "bgs", tmp_path / "fgbgs"
    bg_dir.mkdir(), fg_bg_dir.mkdir()
    for name, fg_bg_size in (("a.jpg", (64, 48)), ("b.jpg", (64, 48)), ("z.jpg", (48, 64))):
        write_image(bg_dir / name, (64, 48), "L", seed=3)
        write_image(fg_bg_dir / name, fg_bg_size, "L", seed=4)
    folders = ["--bg-dir", str(bg_dir), "--fg-bg-dir", str(fg_bg_dir), "--batch-size", "1"]
    assert_refused(tmp_path, capsys, [*argv, *folders], "z.jpg is 48x64")


def test_folders_pair_same_named_files(tmp_path, capsys):
    model = make_checkpoint(tmp_path / "model.pt", 3)
    bg_dir, fg_bg_dir = tmp_path / "bgs", tmp_path / "fgbgs"
    bg_dir.mkdir(), fg_bg_dir.mkdir()
    write_image(bg_dir / "kitchen.jpg", (64, 48), "RGB", seed=1)
    write_image(fg_bg_dir / "kitchen.jpg", (64, 48), "RGB", seed=2)
    write_image(bg_dir / "bg_img_7.jpg", (32, 32), "RGB", seed=3)  # and the dataset's names
    write_image(fg_bg_dir / "fg_bg_1_7_0_2.jpg", (32, 32), "RGB", seed=4)
    (fg_bg_dir / "notes.txt").write_text("not an image")  # ignored
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tmp_path / "model.pt"), "--bg-dir", str(bg_dir)]
    argv += ["--fg-bg-dir", str(fg_bg_dir), "--device", "cpu"]
    assert predict.main([*argv, "--out", str(out)]) == 0
    assert "wrote 2 prediction(s)" in capsys.readouterr().out
    _, kitchen_mask = expected_masks(model, bg_dir / "kitchen.jpg", fg_bg_dir / "kitchen.jpg")
    with Image.open(out / "kitchen_mask.png") as mask:
        np.testing.assert_array_equal(np.asarray(mask), kitchen_mask)
    with Image.open(out / "fg_bg_1_7_0_2_mask.png") as mask:
        assert mask.size == (32, 32)

    # A fg_bg with neither a same-named bg nor a dataset name is refused, not skipped.
    write_image(fg_bg_dir / "garden.jpg", (64, 48), "RGB", seed=5)
    assert_refused(tmp_path, capsys, argv, "no bg named garden.jpg")
    (fg_bg_dir / "garden.jpg").unlink()
    # Two fg_bg files that would write the same {stem}_*.png.
    write_image(bg_dir / "kitchen.png", (64, 48), "RGB", seed=6)
    write_image(fg_bg_dir / "kitchen.png", (64, 48), "RGB", seed=7)
    assert_refused(tmp_path, capsys, argv, "would write the same kitchen_*.png")


def test_existing_predictions_are_replaced_only_with_overwrite(tmp_path, capsys):
    make_checkpoint(tmp_path / "model.pt", 1)
    write_image(tmp_path / "bg.jpg", (48, 48), "L", seed=1)
    write_image(tmp_path / "fg_bg.jpg", (48, 48), "L", seed=2)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tmp_path / "model.pt"), "--device", "cpu"]
    argv += ["--bg", str(tmp_path / "bg.jpg"), "--fg-bg", str(tmp_path / "fg_bg.jpg")]
    assert predict.main([*argv, "--out", str(out)]) == 0
    (out / "fg_bg_figure.png").write_bytes(b"an earlier figure")
    (out / "notes.txt").write_text("the user's file")
    capsys.readouterr()

    assert_refused(tmp_path, capsys, argv, f"{out} already holds fg_bg_mask.png and 4 more")
    assert predict.main([*argv, "--out", str(out)]) == 1
    assert "pass --overwrite to replace them" in capsys.readouterr().err

    assert predict.main([*argv, "--out", str(out), "--overwrite"]) == 0
    with Image.open(out / "fg_bg_figure.png") as figure:
        assert figure.format == "PNG"
    assert (out / "notes.txt").read_text() == "the user's file"
    kinds = ("mask", "depth", "mask_160", "depth_80", "figure")
    expected = ["notes.txt", *(f"fg_bg_{kind}.png" for kind in kinds)]  # no temporaries left
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)

    # An --out that is a file is refused, --overwrite or not.
    (tmp_path / "pred.png").write_bytes(b"a file")
    for extra in ([], ["--overwrite"]):
        assert predict.main([*argv, *extra, "--out", str(tmp_path / "pred.png")]) == 1
        assert "exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "pred.png").read_bytes() == b"a file"


def test_checkpoint_may_be_a_run_directory(tmp_path, capsys):
    run = tmp_path / "runs" / "ref"
    (run / "checkpoints").mkdir(parents=True)
    make_checkpoint(run / "checkpoints" / "best.pt", 1)
    write_image(tmp_path / "bg.jpg", (48, 48), "L", seed=1)
    write_image(tmp_path / "fg_bg.jpg", (48, 48), "L", seed=2)
    pair = ["--bg", str(tmp_path / "bg.jpg"), "--fg-bg", str(tmp_path / "fg_bg.jpg")]
    for checkpoint in (run, run / "checkpoints"):
        out = tmp_path / f"out-{checkpoint.name}"
        argv = ["--checkpoint", str(checkpoint), *pair, "--out", str(out), "--device", "cpu"]
        assert predict.main(argv) == 0, capsys.readouterr().err
        assert (out / "fg_bg_mask.png").is_file()
    capsys.readouterr()
    (run / "checkpoints" / "best.pt").unlink()
    argv = ["--checkpoint", str(run), *pair]
    assert_refused(tmp_path, capsys, argv, f"{run} is a directory without checkpoints/best.pt")


def test_file_that_is_no_checkpoint_gets_our_own_line(tmp_path):
    """Not torch's advice to load with weights_only=False: that would run the file's code."""
    write_image(tmp_path / "bg.jpg", (48, 48), "L", seed=1)
    (tmp_path / "notes.txt").write_text("hello\n")
    pair = ["--bg", str(tmp_path / "bg.jpg"), "--fg-bg", str(tmp_path / "bg.jpg")]
    before = snapshot(tmp_path)
    for name in ("notes.txt", "bg.jpg"):
        result = run_cli(
            "predict.py", "--checkpoint", str(tmp_path / name), *pair, "--out", str(tmp_path / "o")
        )
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "not a plain-tensor checkpoint" in lines[0] and "weights_only" not in lines[0]
        assert snapshot(tmp_path) == before


def test_omp_wait_policy_is_passive_before_torch_is_imported(tmp_path):
    """Run directly (not by make), predict.py still keeps OpenMP from busy-waiting."""
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):  # ACTIVE: the user's choice
        assert omp_policy_when_torch_loads("predict", given) == f"[{expected!r}]"
