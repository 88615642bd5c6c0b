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
from model import UNet, UNetConfig
from pipeline import build_loader
from tests.conftest import run_cli
from training.checkpoint import TrainState, save_checkpoint


def make_checkpoint(path, channels: int) -> UNet:
    """A checkpoint in train.py's format for a small random UNet; returns the model."""
    torch.manual_seed(channels)
    cfg = train.TrainConfig(data="unused", widths=(4, 8, 16))
    unet_cfg = UNetConfig(in_channels=channels, widths=cfg.widths)
    model = UNet(unet_cfg).eval()
    optimizer, scheduler = train.build_optimizer(cfg, model)
    loader_cfg = predict.LoaderConfig()
    loss_fn = train.MaskDepthLoss()
    config = asdict(cfg)
    state = TrainState(model, model, loss_fn, optimizer, scheduler, unet_cfg, loader_cfg, config)
    save_checkpoint(state.state_dict(), path)
    return model


def write_image(path, size: tuple[int, int], mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


def expected_mask(model: UNet, bg_path, fg_bg_path) -> np.ndarray:
    """The mask predict.py should write, computed here from the model directly."""
    mode = "L" if model.cfg.in_channels == 1 else "RGB"

    def load(path):
        with Image.open(path) as image:
            image = image.convert(mode).resize((160, 160), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32).reshape(160, 160, -1) / 255.0
        return (torch.from_numpy(array).permute(2, 0, 1)[None] - 0.5) / 0.25

    with torch.no_grad():
        mask_logits, _ = model(torch.cat([load(bg_path), load(fg_bg_path)], dim=1))
    return (torch.sigmoid(mask_logits)[0, 0] > 0.5).numpy().astype(np.uint8) * 255


@pytest.mark.parametrize(("channels", "mode", "size"), [(1, "RGB", (200, 120)), (3, "L", (50, 70))])
def test_single_pair_writes_model_sized_outputs(tmp_path, channels, mode, size):
    model = make_checkpoint(tmp_path / "model.pt", channels)
    bg, fg_bg = tmp_path / "bg.jpg", tmp_path / "fg_bg_1_2_0_3.jpg"
    write_image(bg, size, mode, seed=1)
    write_image(fg_bg, size, mode, seed=2)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tmp_path / "model.pt"), "--bg", str(bg), "--fg-bg", str(fg_bg)]
    assert predict.main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    with Image.open(out / "fg_bg_1_2_0_3_mask.png") as mask:
        assert mask.size == (160, 160) and mask.mode == "L"
        np.testing.assert_array_equal(np.asarray(mask), expected_mask(model, bg, fg_bg))
    with Image.open(out / "fg_bg_1_2_0_3_depth.png") as depth:
        assert depth.size == (80, 80) and depth.mode == "L"
    with Image.open(out / "fg_bg_1_2_0_3_figure.png") as figure:
        assert figure.width >= 4 * 160 and figure.height >= 160


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
        f"{s}_{kind}.png" for s in stems for kind in ("mask", "depth", "figure")
    )

    (bg_dir / "bg_img_2.jpg").unlink()
    assert predict.main(argv) == 1
    assert "no bg_img_{b}.jpg" in capsys.readouterr().err


def test_bad_input_is_one_line_error(tmp_path):
    make_checkpoint(tmp_path / "model.pt", 1)
    write_image(tmp_path / "bg.jpg", (160, 160), "L", seed=1)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    cases = [
        (["--bg", str(tmp_path / "bg.jpg")], "give both"),
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


def test_missing_or_foreign_checkpoint_is_refused(tmp_path, capsys):
    write_image(tmp_path / "bg.jpg", (160, 160), "L", seed=1)
    pair = ["--bg", str(tmp_path / "bg.jpg"), "--fg-bg", str(tmp_path / "bg.jpg")]
    out = ["--out", str(tmp_path / "out")]
    assert predict.main(["--checkpoint", str(tmp_path / "none.pt"), *pair, *out]) == 1
    assert "does not exist" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert predict.main(["--checkpoint", str(tmp_path / "foreign.pt"), *pair, *out]) == 1
    assert "not a maskdepth checkpoint" in capsys.readouterr().err
