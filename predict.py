"""Predict the foreground mask and depth map for bg / fg_bg image pairs with a trained model.

    python predict.py --checkpoint RUN/checkpoints/best.pt --bg bg.jpg --fg-bg fg_bg.jpg --out pred
    python predict.py --checkpoint CKPT --bg-dir bg_jpg --fg-bg-dir fg_bg_jpg --out pred

For each pair writes ``{stem}_mask.png`` (mask_size, 0/255), ``{stem}_depth.png`` (depth_size,
0-255) and ``{stem}_figure.png`` (bg | fg_bg | mask | depth), where stem is the fg_bg file's.
Inputs of any size, gray or colour, are converted to the model's channel count and resized.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from model import UNet, UNetConfig
from pipeline import LoaderConfig, denormalize
from pipeline.grid import compose, save_png, to_pil
from pipeline.preprocess import decode, image_mode, normalize
from sharding.layout import classify
from training.checkpoint import CheckpointError, load_checkpoint
from training.distributed import DEVICES, DeviceError, resolve_device


class PredictError(Exception):
    """A user mistake; printed as one line on stderr."""


@dataclass(frozen=True)
class PredictConfig:
    """What to predict, with which checkpoint, and where to write it."""

    checkpoint: str
    out: str
    bg: str | None = None
    fg_bg: str | None = None
    bg_dir: str | None = None
    fg_bg_dir: str | None = None
    batch_size: int = 16
    threshold: float = 0.5
    device: str = "auto"


def parse_args(argv: list[str] | None = None) -> PredictConfig:
    """Parse ``argv``; exactly one of the (--bg, --fg-bg) and (--bg-dir, --fg-bg-dir) pairs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="last.pt or best.pt written by train.py")
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_argument_group("One pair")
    g.add_argument("--bg", help="background image")
    g.add_argument("--fg-bg", help="foreground-on-background image")
    g = p.add_argument_group("Folders of pairs, by the dataset's names")
    g.add_argument("--bg-dir", help="folder of bg_img_{b}.jpg")
    g.add_argument("--fg-bg-dir", help="folder of fg_bg_{f}_{b}_{flip}_{n}.jpg")
    g = p.add_argument_group("Run")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--threshold", type=float, default=0.5, help="mask probability cut-off")
    g.add_argument("--device", choices=DEVICES, default="auto")
    cfg = PredictConfig(**vars(p.parse_args(argv)))
    single, folders = (cfg.bg, cfg.fg_bg), (cfg.bg_dir, cfg.fg_bg_dir)
    if any(single) == any(folders):
        raise PredictError("give either --bg and --fg-bg, or --bg-dir and --fg-bg-dir")
    if not (all(single) or all(folders)):
        raise PredictError("--bg goes with --fg-bg, and --bg-dir with --fg-bg-dir; give both")
    if cfg.batch_size < 1:
        raise PredictError(f"--batch-size {cfg.batch_size} must be at least 1")
    return cfg


def load_model(path: str, device: torch.device) -> tuple[UNet, LoaderConfig]:
    """The UNet from a train.py checkpoint, and the loader config it was trained with."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise PredictError(str(e)) from e
    saved = state["model_config"]
    unet_cfg = UNetConfig(**{**saved, "widths": tuple(saved["widths"])})
    model = UNet(unet_cfg)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), LoaderConfig(**state["loader_config"])


def find_pairs(cfg: PredictConfig) -> list[tuple[Path, Path]]:
    """``(bg, fg_bg)`` paths: the one given pair, or folders matched by the dataset's names."""
    if cfg.bg:
        pairs = [(Path(cfg.bg), Path(cfg.fg_bg))]
    else:
        bg_dir, fg_bg_dir = Path(cfg.bg_dir), Path(cfg.fg_bg_dir)
        for folder in (bg_dir, fg_bg_dir):
            if not folder.is_dir():
                raise PredictError(f"{folder} is not a directory")
        # sharding.layout knows the dataset's file names; give it zip-style member paths.
        layout = classify(
            [f"bg_jpg/{p.name}" for p in bg_dir.iterdir()]
            + [f"fg_bg_jpg/{p.name}" for p in fg_bg_dir.iterdir()]
        )
        missing = sorted({sid[1] for sid in layout.fg_bg if sid[1] not in layout.bg})
        if missing:
            raise PredictError(
                f"no bg_img_{{b}}.jpg in {bg_dir} for b in {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}; every fg_bg needs its background"
            )
        pairs = [
            (bg_dir / Path(layout.bg[sid[1]]).name, fg_bg_dir / Path(name).name)
            for sid, name in sorted(layout.fg_bg.items())
        ]
        if not pairs:
            raise PredictError(f"no fg_bg_{{f}}_{{b}}_{{flip}}_{{n}}.jpg files in {fg_bg_dir}")
    for path in {p for pair in pairs for p in pair}:
        if not path.is_file():
            raise PredictError(f"{path} does not exist")
    return pairs


def read_images(
    paths: list[Path], channels: int, size: int, loader_cfg: LoaderConfig
) -> torch.Tensor:
    """``(B, C, size, size)``, decoded, resized and normalised as the test loader does."""
    images = []
    for path in paths:
        try:
            images.append(decode(path, image_mode(channels), size))  # uint8 (size, size, C)
        except OSError as e:  # PIL's UnidentifiedImageError is one
            raise PredictError(f"cannot read image {path}: {e}") from e
    return normalize(torch.from_numpy(np.stack(images)), loader_cfg)


def write_outputs(
    out: Path,
    stem: str,
    bg: torch.Tensor,
    fg_bg: torch.Tensor,
    mask: torch.Tensor,
    depth: torch.Tensor,
    loader_cfg: LoaderConfig,
) -> None:
    """Mask and depth PNGs at the model's sizes and the side-by-side figure."""
    mask_u8 = (mask[0].numpy() * 255).astype(np.uint8)
    save_png(Image.fromarray(mask_u8, mode="L"), out / f"{stem}_mask.png")
    depth_u8 = (depth[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    save_png(Image.fromarray(depth_u8, mode="L"), out / f"{stem}_depth.png")
    size = bg.shape[-1]
    up = F.interpolate(depth[None], size=size, mode="bilinear", align_corners=False)[0]
    cells = [
        to_pil(denormalize(bg, loader_cfg)),
        to_pil(denormalize(fg_bg, loader_cfg)),
        to_pil(mask),
        to_pil(up),
    ]
    headers = ("bg", "fg_bg", "mask (pred)", "depth (pred)")
    save_png(compose([cells], headers), out / f"{stem}_figure.png")


@torch.no_grad()
def predict(cfg: PredictConfig) -> list[Path]:
    """Run the model over every pair; returns the figure paths."""
    try:
        device = resolve_device(cfg.device)
    except DeviceError as e:
        raise PredictError(str(e)) from e
    model, loader_cfg = load_model(cfg.checkpoint, device)
    channels, size = model.cfg.in_channels, model.cfg.mask_size
    pairs = find_pairs(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    bar = tqdm(total=len(pairs), unit="pair", desc="predict", disable=len(pairs) < 2)
    for start in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[start : start + cfg.batch_size]
        bg = read_images([b for b, _ in chunk], channels, size, loader_cfg)
        fg_bg = read_images([f for _, f in chunk], channels, size, loader_cfg)
        mask_logits, depth = model(UNet.input_from(bg, fg_bg).to(device))
        masks = (torch.sigmoid(mask_logits.float()) > cfg.threshold).float().cpu()
        depth = depth.float().cpu()
        for i, (_, fg_bg_path) in enumerate(chunk):
            write_outputs(out, fg_bg_path.stem, bg[i], fg_bg[i], masks[i], depth[i], loader_cfg)
            written.append(out / f"{fg_bg_path.stem}_figure.png")
        bar.update(len(chunk))
    bar.close()
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI entry: one line on stderr and exit status 1 for a user mistake."""
    try:
        written = predict(parse_args(argv))
    except PredictError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} prediction(s) to {written[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
