"""Predict the foreground mask and depth map for bg / fg_bg image pairs with a trained model.

    python predict.py --checkpoint RUN_DIR --bg bg.jpg --fg-bg fg_bg.jpg --out pred
    python predict.py --checkpoint RUN/checkpoints/best.pt --bg-dir bgs --fg-bg-dir fgbgs --out pred

--checkpoint takes a .pt file written by train.py or a run directory (its checkpoints/best.pt).
In folder mode each fg_bg is paired with the bg of the same file name (bgs/kitchen.jpg with
fgbgs/kitchen.jpg) or, by the dataset's names, fg_bg_{f}_{b}_{flip}_{n}.jpg with bg_img_{b}.jpg.
A bg and its fg_bg must be the same size.

For each pair, with stem the fg_bg file's, writes

    {stem}_mask.png, {stem}_depth.png    at the input's size, to lay over the photo
    {stem}_mask_160.png, {stem}_depth_80.png    at the model's resolution (mask_size, depth_size)
    {stem}_figure.png    bg | fg_bg | mask | depth, as the model saw them

each through the atomic writer. If --out already holds any of these files, nothing is written
unless --overwrite is given; other files in --out are left alone.

Masks are 0/255 and depth maps 0-255. Inputs of any size, grey or colour, are converted to the
model's channel count and resized to its square input, as the test loader does; a line says
when that changes an input's aspect ratio.
"""

from __future__ import annotations

import sharding.openmp  # noqa: F401  (first: OpenMP's wait policy, before torch loads)

# isort: split

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
from sharding.layout import classify, is_junk
from training.checkpoint import CheckpointError, load_checkpoint, saved_model_config
from training.distributed import DEVICES, DeviceError, resolve_device
from training.rundir import RunDir

# File suffixes PIL can open: other files in a folder (notes, checksums) are not inputs.
IMAGE_SUFFIXES = frozenset(Image.registered_extensions())


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
    overwrite: bool = False


@dataclass(frozen=True)
class Pair:
    """One bg and its fg_bg, and their size in pixels (width, height)."""

    bg: Path
    fg_bg: Path
    size: tuple[int, int]


def parse_args(argv: list[str] | None = None) -> PredictConfig:
    """Parse ``argv``; exactly one of the (--bg, --fg-bg) and (--bg-dir, --fg-bg-dir) pairs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="best.pt or last.pt written by train.py, or a run directory (uses its best.pt)",
    )
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace predictions already in --out (without it, an existing one is refused)",
    )
    g = p.add_argument_group("One pair")
    g.add_argument("--bg", help="background image")
    g.add_argument("--fg-bg", help="the same background with the object in it, at the same size")
    g = p.add_argument_group("Folders of pairs, by the same file name or by the dataset's names")
    g.add_argument("--bg-dir", help="folder of backgrounds: NAME.jpg, or bg_img_{b}.jpg")
    g.add_argument("--fg-bg-dir", help="folder of NAME.jpg, or fg_bg_{f}_{b}_{flip}_{n}.jpg")
    g = p.add_argument_group("Run")
    g.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass")
    g.add_argument("--threshold", type=float, default=0.5, help="mask probability cut-off")
    g.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when visible")
    cfg = PredictConfig(**vars(p.parse_args(argv)))
    # Usage errors: argparse's message and exit status 2, as for an unknown option.
    single, folders = (cfg.bg, cfg.fg_bg), (cfg.bg_dir, cfg.fg_bg_dir)
    if any(single) == any(folders):
        p.error("give either --bg and --fg-bg, or --bg-dir and --fg-bg-dir")
    if not (all(single) or all(folders)):
        p.error("--bg goes with --fg-bg, and --bg-dir with --fg-bg-dir; give both")
    if cfg.batch_size < 1:
        p.error(f"--batch-size {cfg.batch_size} must be at least 1")
    return cfg


def checkpoint_path(path: str) -> Path:
    """The checkpoint file ``--checkpoint`` names: the file itself, or a run directory's best.pt."""
    given = Path(path)
    if not given.is_dir():
        return given
    # A run directory as train.py writes it, or its checkpoints/ folder.
    for candidate in (RunDir(given).best, given / RunDir(given).best.name):
        if candidate.is_file():
            return candidate
    raise PredictError(
        f"{given} is a directory without {RunDir(given).best.relative_to(given)}; pass a run "
        "directory written by train.py, or a checkpoint file"
    )


def load_model(path: str, device: torch.device) -> tuple[UNet, LoaderConfig]:
    """The UNet from a train.py checkpoint (or run directory), and its loader config."""
    try:
        state = load_checkpoint(checkpoint_path(path))
    except CheckpointError as e:
        raise PredictError(str(e)) from e
    model = UNet(UNetConfig(**saved_model_config(state)))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), LoaderConfig(**state["loader_config"])


def image_files(folder: Path) -> list[Path]:
    """The images in ``folder``, by name; hidden files and other files are not inputs."""
    if not folder.is_dir():
        raise PredictError(f"{folder} is not a directory")
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not p.name.startswith(".")
        and not is_junk(p.name)
    )


def pair_folders(bg_dir: Path, fg_bg_dir: Path) -> list[tuple[Path, Path]]:
    """Each fg_bg with the bg of the same name, else with bg_img_{b}.jpg by the dataset's names."""
    bgs = {p.name: p for p in image_files(bg_dir)}
    fg_bgs = image_files(fg_bg_dir)
    if not fg_bgs:
        raise PredictError(f"no images in {fg_bg_dir}")
    # sharding.layout knows the dataset's file names; give it zip-style member paths.
    layout = classify([f"bg_jpg/{n}" for n in bgs] + [f"fg_bg_jpg/{p.name}" for p in fg_bgs])
    dataset_b = {Path(name).name: sid[1] for sid, name in layout.fg_bg.items()}
    pairs, missing_b, unmatched = [], set(), []
    for fg_bg in fg_bgs:
        if fg_bg.name in bgs:
            pairs.append((bgs[fg_bg.name], fg_bg))
        elif fg_bg.name in dataset_b and dataset_b[fg_bg.name] in layout.bg:
            pairs.append((bg_dir / Path(layout.bg[dataset_b[fg_bg.name]]).name, fg_bg))
        elif fg_bg.name in dataset_b:
            missing_b.add(dataset_b[fg_bg.name])
        else:
            unmatched.append(fg_bg.name)
    if missing_b:
        missing = sorted(missing_b)
        raise PredictError(
            f"no bg_img_{{b}}.jpg in {bg_dir} for b in {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; every fg_bg needs its background"
        )
    if unmatched:
        raise PredictError(
            f"no bg named {unmatched[0]} in {bg_dir}"
            f"{f' (nor for {len(unmatched) - 1} more)' if len(unmatched) > 1 else ''}; "
            "give each fg_bg a bg of the same file name, or use the dataset's names"
        )
    stems: dict[str, str] = {}
    for _, fg_bg in pairs:
        if fg_bg.stem in stems:
            raise PredictError(
                f"{stems[fg_bg.stem]} and {fg_bg.name} in {fg_bg_dir} would write the same "
                f"{fg_bg.stem}_*.png; rename one"
            )
        stems[fg_bg.stem] = fg_bg.name
    return pairs


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding it."""
    if not path.is_file():
        raise PredictError(f"{path} does not exist")
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as e:  # PIL's UnidentifiedImageError is one
        raise PredictError(f"cannot read image {path}: {e}") from e


def find_pairs(cfg: PredictConfig) -> list[Pair]:
    """The given pair, or the folders' pairs; each checked readable and of one size."""
    if cfg.bg:
        paths = [(Path(cfg.bg), Path(cfg.fg_bg))]
    else:
        paths = pair_folders(Path(cfg.bg_dir), Path(cfg.fg_bg_dir))
    pairs = []
    for bg, fg_bg in paths:
        bg_size, fg_bg_size = image_size(bg), image_size(fg_bg)
        if bg_size != fg_bg_size:
            raise PredictError(
                f"{bg} is {bg_size[0]}x{bg_size[1]} but {fg_bg} is "
                f"{fg_bg_size[0]}x{fg_bg_size[1]}; "
                "a fg_bg is its bg with the object pasted in, so give both at the same size"
            )
        pairs.append(Pair(bg, fg_bg, fg_bg_size))
    return pairs


def check_out(out: Path, names: list[str], overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, or that holds any of ``names`` unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise PredictError(f"--out {out} exists and is not a directory; choose another --out")
    existing = [name for name in names if (out / name).exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise PredictError(
            f"{out} already holds {existing[0]}{more} that this run would write; "
            "pass --overwrite to replace them, or choose another --out"
        )


def aspect_note(pairs: list[Pair], size: int) -> str | None:
    """One line when the model's square input changes any input's aspect ratio, else None."""
    changed = [p for p in pairs if p.size[0] != p.size[1]]
    if not changed:
        return None
    first = changed[0]
    (w, h), name = first.size, first.fg_bg.name
    if len(pairs) == 1:
        return (
            f"note: {name} is {w}x{h}; the model sees it squashed to {size}x{size}, which changes "
            f"its aspect ratio; _mask.png and _depth.png are scaled back to {w}x{h}"
        )
    return (
        f"note: {len(changed)} of {len(pairs)} pairs are not square (first: {name}, {w}x{h}); the "
        f"model sees them squashed to {size}x{size}, which changes their aspect ratio; _mask.png "
        "and _depth.png are scaled back to each input's size"
    )


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


def to_size(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(1, h, w)`` resized bilinearly to ``size`` = (width, height)."""
    width, height = size
    if image.shape[-2:] == (height, width):
        return image
    return F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def gray_png(image: torch.Tensor, path: Path) -> None:
    """``(1, H, W)`` in [0, 1] as an 8-bit grey PNG."""
    array = (image[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    save_png(Image.fromarray(array, mode="L"), path)


def output_names(stem: str, cfg: UNetConfig) -> dict[str, str]:
    """What predict.py writes for one pair, by kind."""
    return {
        "mask": f"{stem}_mask.png",
        "depth": f"{stem}_depth.png",
        "mask_model": f"{stem}_mask_{cfg.mask_size}.png",
        "depth_model": f"{stem}_depth_{cfg.depth_size}.png",
        "figure": f"{stem}_figure.png",
    }


def write_outputs(
    out: Path,
    names: dict[str, str],
    pair: Pair,
    bg: torch.Tensor,
    fg_bg: torch.Tensor,
    mask_prob: torch.Tensor,
    depth: torch.Tensor,
    threshold: float,
    loader_cfg: LoaderConfig,
) -> None:
    """Mask and depth PNGs at the input's and the model's sizes, and the side-by-side figure."""
    mask = (mask_prob > threshold).float()  # (1, mask_size, mask_size)
    gray_png(mask, out / names["mask_model"])
    gray_png(depth, out / names["depth_model"])
    # The probability is resized, then cut: smoother edges than resizing the 0/1 mask.
    gray_png((to_size(mask_prob, pair.size) > threshold).float(), out / names["mask"])
    gray_png(to_size(depth, pair.size), out / names["depth"])
    size = bg.shape[-1]
    up = F.interpolate(depth[None], size=size, mode="bilinear", align_corners=False)[0]
    cells = [
        to_pil(denormalize(bg, loader_cfg)),
        to_pil(denormalize(fg_bg, loader_cfg)),
        to_pil(mask),
        to_pil(up),
    ]
    headers = ("bg", "fg_bg", "mask (pred)", "depth (pred)")
    save_png(compose([cells], headers), out / names["figure"])


@torch.no_grad()
def predict(cfg: PredictConfig) -> list[Path]:
    """Run the model over every pair; returns the figure paths."""
    try:
        device = resolve_device(cfg.device)
    except DeviceError as e:
        raise PredictError(str(e)) from e
    model, loader_cfg = load_model(cfg.checkpoint, device)
    channels, size = model.cfg.in_channels, model.cfg.mask_size
    pairs = find_pairs(cfg)  # every input is checked before anything is written
    out = Path(cfg.out)
    outputs = [output_names(p.fg_bg.stem, model.cfg) for p in pairs]
    check_out(out, [name for names in outputs for name in names.values()], cfg.overwrite)
    if note := aspect_note(pairs, size):
        print(note)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    bar = tqdm(total=len(pairs), unit="pair", desc="predict", disable=len(pairs) < 2)
    for start in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[start : start + cfg.batch_size]
        bg = read_images([p.bg for p in chunk], channels, size, loader_cfg)
        fg_bg = read_images([p.fg_bg for p in chunk], channels, size, loader_cfg)
        mask_logits, depth = model(UNet.input_from(bg, fg_bg).to(device))
        mask_prob = torch.sigmoid(mask_logits.float()).cpu()
        depth = depth.float().cpu()
        for i, pair in enumerate(chunk):
            names = outputs[start + i]
            write_outputs(
                out, names, pair, bg[i], fg_bg[i], mask_prob[i], depth[i], cfg.threshold, loader_cfg
            )
            written.append(out / names["figure"])
        bar.update(len(chunk))
    bar.close()
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI entry: exit status 2 for a usage error (argparse's), 1 with one line for bad input."""
    try:
        written = predict(parse_args(argv))
    except PredictError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} prediction(s) to {written[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
