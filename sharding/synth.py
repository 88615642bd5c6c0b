"""Generate zips in the real EVA dataset's layout: for users without the 6 GB set, demo and tests.

    python -m sharding.synth --out data/zips --batches 10 --backgrounds 100 --foregrounds 100

Each ``batch{k}_images.zip`` holds ``bg_jpg/``, ``fg_bg_jpg/``, ``mask_black_jpg/`` and
``depth_fg_bg_jpg/`` exactly as the original does. Foregrounds are split across batches, so the
last batch's foregrounds are never seen in training. Output is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import io
import itertools
import multiprocessing
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from sharding.atomic import TMP_PREFIX, atomic_path
from sharding.shard_format import GEOMETRY

# A fixed timestamp keeps zips byte-identical between runs with the same seed.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class SynthConfig:
    """What to generate; see ``--help`` for each field."""

    out: str
    batches: int = 10
    backgrounds: int = 100
    foregrounds: int = 100
    placements: int = 20
    seed: int = 0
    image_size: int = GEOMETRY.image_size
    depth_size: int = GEOMETRY.depth_size
    rgb: bool = False
    assets: str | None = None
    quality: int = 90
    workers: int = 1

    def validate(self) -> None:
        """Reject settings that cannot produce a dataset, naming the fix."""
        for name in ("batches", "backgrounds", "foregrounds", "placements"):
            if getattr(self, name) < 1:
                raise SynthError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.foregrounds < self.batches:
            raise SynthError(
                f"--foregrounds ({self.foregrounds}) must be >= --batches ({self.batches}): "
                "foregrounds are split across batches, so each batch needs at least one"
            )
        if self.image_size < 32 or self.depth_size < 8:
            raise SynthError("--image-size must be >= 32 and --depth-size >= 8")
        if not 1 <= self.quality <= 100:
            raise SynthError(f"--quality must be in 1..100, got {self.quality}")

    @property
    def samples_per_batch(self) -> list[int]:
        """Samples in each batch zip: its foregrounds × backgrounds × 2 flips × placements."""
        return [len(fg_ids) * self.backgrounds * 2 * self.placements for fg_ids in self.fg_split()]

    def fg_split(self) -> list[list[int]]:
        """1-based foreground ids for each batch, split as evenly as possible."""
        bounds = np.linspace(0, self.foregrounds, self.batches + 1).round().astype(int)
        return [list(range(lo + 1, hi + 1)) for lo, hi in itertools.pairwise(bounds)]


class SynthError(Exception):
    """A setting or asset problem the user can fix."""


# --- images ---------------------------------------------------------------------------------


def _procedural_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """An office-like room: a wall, a floor below a horizon, and a few boxes. (H, W, 3) uint8."""
    horizon = int(size * rng.uniform(0.3, 0.55))
    wall = rng.uniform(90, 220, size=3)
    floor = rng.uniform(40, 160, size=3)
    img = np.empty((size, size, 3), np.float32)
    img[:horizon] = wall
    rows = np.linspace(0.6, 1.2, size - horizon)[:, None, None]
    img[horizon:] = floor * rows
    for _ in range(rng.integers(2, 6)):  # furniture and windows
        w, h = rng.integers(size // 10, size // 3, size=2)
        x, y = rng.integers(0, size - w), rng.integers(0, size - h)
        img[y : y + h, x : x + w] = rng.uniform(20, 240, size=3)
    img += rng.normal(0, 6, size=img.shape)  # sensor noise, so JPEGs look photographic
    return np.clip(img, 0, 255).astype(np.uint8)


def _procedural_foreground(rng: np.random.Generator, size: int) -> np.ndarray:
    """A blob-shaped object with a textured colour. (h, w, 4) uint8 RGBA."""
    h = int(rng.integers(size // 4, size // 2))
    w = int(rng.integers(size // 6, size // 3))
    yy, xx = np.mgrid[0:h, 0:w]
    alpha = np.zeros((h, w), bool)
    for _ in range(rng.integers(2, 5)):  # union of ellipses: a person- or chair-like silhouette
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.3, 0.7) * w
        ry, rx = rng.uniform(0.15, 0.5) * h, rng.uniform(0.2, 0.5) * w
        alpha |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    colour = rng.uniform(0, 255, size=3)
    shade = np.linspace(0.7, 1.2, h)[:, None, None]
    rgb = np.clip(colour * shade + rng.normal(0, 10, size=(h, w, 3)), 0, 255)
    return np.dstack([rgb, alpha * 255]).astype(np.uint8)


def _asset_files(assets: Path) -> tuple[list[Path], list[Path]]:
    """The background photos (``bg/*.jpg``) and cut-outs (``fg/*.png``) in ``assets``."""
    if not assets.is_dir():
        raise SynthError(f"--assets {assets}: no such directory")
    bg_files = sorted((assets / "bg").glob("*.jpg"))
    fg_files = sorted((assets / "fg").glob("*.png"))
    if not bg_files or not fg_files:
        raise SynthError(f"{assets}: expected bg/*.jpg and fg/*.png (see shared/eva-assets)")
    return bg_files, fg_files


def _load_assets(assets: Path, cfg: SynthConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Real backgrounds (``bg/*.jpg``) and RGBA cut-outs (``fg/*.png``), cycled to the counts."""
    bg_files, fg_files = _asset_files(assets)
    size = cfg.image_size
    bgs = [
        np.asarray(Image.open(bg_files[i % len(bg_files)]).convert("RGB").resize((size, size)))
        for i in range(cfg.backgrounds)
    ]
    fgs = []
    for i in range(cfg.foregrounds):
        fg = Image.open(fg_files[i % len(fg_files)]).convert("RGBA")
        # The original recipe resized cut-outs small before pasting: longer side ~ half the frame.
        scale = (size * 0.5) / max(fg.size)
        fg = fg.resize((max(1, round(fg.width * scale)), max(1, round(fg.height * scale))))
        fgs.append(np.asarray(fg))
    return bgs, fgs


def _floor_depth(size: int, horizon: float) -> np.ndarray:
    """Far-is-bright depth of an empty room, (size, size) float: wall far, floor nearer downward."""
    rows = np.arange(size, dtype=np.float32)[:, None] / (size - 1)
    below = np.clip((rows - horizon) / (1 - horizon + 1e-6), 0, 1)
    # Inverse-perspective: distance falls off like 1 / (row below the horizon).
    depth = 1.0 / (0.15 + 0.85 * below)
    return np.broadcast_to(depth, (size, size)).copy()


def _jpeg(array: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _compose(bg: np.ndarray, fg: np.ndarray, x: int, y: int) -> tuple[np.ndarray, np.ndarray]:
    """Paste RGBA ``fg`` on ``bg`` at (x, y); return the image and the binary mask."""
    out = bg.copy()
    h, w = fg.shape[:2]
    alpha = fg[..., 3:4].astype(np.float32) / 255
    region = out[y : y + h, x : x + w].astype(np.float32)
    out[y : y + h, x : x + w] = (fg[..., :3] * alpha + region * (1 - alpha)).astype(np.uint8)
    mask = np.zeros(bg.shape[:2], np.uint8)
    mask[y : y + h, x : x + w] = np.where(fg[..., 3] > 127, 255, 0)
    return out, mask


def _depth_map(horizon: float, mask: np.ndarray, foot_row: int, size: int, depth_size: int):
    """Depth at ``depth_size``: the room, and the object at the floor depth where it stands."""
    depth = _floor_depth(size, horizon)
    depth[mask > 0] = depth[min(foot_row, size - 1), 0]
    small = np.asarray(Image.fromarray(depth).resize((depth_size, depth_size), Image.BILINEAR))
    lo, hi = float(small.min()), float(small.max())
    # Scaled per image to 0-255, as the original depth maps are.
    return ((small - lo) / max(hi - lo, 1e-6) * 255).round().astype(np.uint8)


def _write_batch(args: tuple[SynthConfig, int]) -> tuple[str, int]:
    """Write one ``batch{k}_images.zip`` atomically; return its path and sample count."""
    cfg, batch = args
    rng = np.random.default_rng([cfg.seed, batch])
    if cfg.assets:
        bgs, fgs = _load_assets(Path(cfg.assets), cfg)
    else:
        scene_rng = np.random.default_rng([cfg.seed, 10_000])  # same scenes in every batch
        bgs = [_procedural_background(scene_rng, cfg.image_size) for _ in range(cfg.backgrounds)]
        fgs = [_procedural_foreground(scene_rng, cfg.image_size) for _ in range(cfg.foregrounds)]
    horizons = np.random.default_rng([cfg.seed, 20_000]).uniform(0.3, 0.55, cfg.backgrounds)

    def encode(rgb: np.ndarray) -> bytes:
        img = rgb if cfg.rgb else np.asarray(Image.fromarray(rgb).convert("L"))
        return _jpeg(img, cfg.quality)

    out = Path(cfg.out) / f"batch{batch}_images.zip"
    count = 0
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:

        def put(name: str, data: bytes) -> None:
            zf.writestr(zipfile.ZipInfo(name, date_time=_ZIP_DATE), data)

        for b in range(1, cfg.backgrounds + 1):
            put(f"bg_jpg/bg_img_{b}.jpg", encode(bgs[b - 1]))
        for f in cfg.fg_split()[batch - 1]:
            for flip in (0, 1):
                fg = fgs[f - 1][:, ::-1] if flip else fgs[f - 1]
                h, w = fg.shape[:2]
                for b in range(1, cfg.backgrounds + 1):
                    for n in range(1, cfg.placements + 1):
                        x = int(rng.integers(0, cfg.image_size - w + 1))
                        y = int(rng.integers(0, cfg.image_size - h + 1))
                        fg_bg, mask = _compose(bgs[b - 1], fg, x, y)
                        depth = _depth_map(
                            horizons[b - 1], mask, y + h - 1, cfg.image_size, cfg.depth_size
                        )
                        stem = f"{f}_{b}_{flip}_{n}"
                        put(f"fg_bg_jpg/fg_bg_{stem}.jpg", encode(fg_bg))
                        put(f"mask_black_jpg/bg_mask_{stem}.jpg", _jpeg(mask, cfg.quality))
                        put(f"depth_fg_bg_jpg/depth_fg_bg_{stem}.jpg", _jpeg(depth, cfg.quality))
                        count += 1
                        if count % 64 == 0:
                            _report_progress(64)
    return str(out), count


_progress = None  # a shared sample counter, so the bar moves while a batch is being written


def _init_worker(counter) -> None:
    global _progress
    _progress = counter


def _report_progress(n: int) -> None:
    if _progress is not None:
        with _progress.get_lock():
            _progress.value += n


def generate(cfg: SynthConfig, progress: bool = True) -> list[Path]:
    """Write every batch zip of ``cfg``; return their paths in batch order."""
    cfg.validate()
    if cfg.assets:
        _asset_files(Path(cfg.assets))  # fail before creating anything
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(cfg, k) for k in range(1, cfg.batches + 1)]
    counter = multiprocessing.Value("q", 0)
    bar = tqdm(
        total=sum(cfg.samples_per_batch),
        unit="sample",
        desc="synth",
        disable=None if progress else True,
    )
    try:
        with ProcessPoolExecutor(
            cfg.workers, initializer=_init_worker, initargs=(counter,)
        ) as pool:
            futures = [pool.submit(_write_batch, job) for job in jobs]
            while not all(f.done() for f in futures):
                time.sleep(0.2)
                bar.update(counter.value - bar.n)
            paths = [Path(f.result()[0]) for f in futures]
        bar.update(bar.total - bar.n)
    finally:
        bar.close()
        # A killed worker skips the atomic writer's own cleanup: an unfinished batch leaves no zip.
        for tmp in out.glob(f"{TMP_PREFIX}*-batch*_images.zip"):
            tmp.unlink(missing_ok=True)
    return paths


def parse_args(argv: list[str] | None = None) -> SynthConfig:
    """Parse the command line into a ``SynthConfig``."""
    p = argparse.ArgumentParser(
        prog="python -m sharding.synth",
        description="Write batch{k}_images.zip files in the real EVA dataset's layout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="directory for the zips")
    p.add_argument("--batches", type=int, default=10, help="number of batch zips")
    p.add_argument("--backgrounds", type=int, default=100, help="backgrounds (in every batch)")
    p.add_argument("--foregrounds", type=int, default=100, help="foregrounds, split over batches")
    p.add_argument("--placements", type=int, default=20, help="random placements per fg/bg/flip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--image-size", type=int, default=GEOMETRY.image_size, help="bg, fg_bg and mask side"
    )
    p.add_argument("--depth-size", type=int, default=GEOMETRY.depth_size, help="depth map side")
    p.add_argument("--rgb", action="store_true", help="colour JPEGs (the real set is grayscale)")
    p.add_argument("--assets", help="real assets: DIR/bg/*.jpg and DIR/fg/*.png (RGBA cut-outs)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--workers", type=int, default=1, help="batches written in parallel")
    a = p.parse_args(argv)
    return SynthConfig(**{k: v for k, v in vars(a).items()})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        cfg.validate()
    except SynthError as e:  # a bad option value: a usage error
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        paths = generate(cfg)
    except SynthError as e:  # unusable assets
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted: finished zips are kept, the unfinished one was removed", file=sys.stderr
        )
        return 130
    except OSError as e:
        print(f"error: {e.filename or cfg.out}: {e.strerror}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    total = sum(cfg.samples_per_batch)
    print(
        f"wrote {len(paths)} zips, {total} samples to {cfg.out} in {elapsed:.1f} s "
        f"({total / elapsed:.0f} samples/s)"
    )
    print(f"config: {asdict(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
