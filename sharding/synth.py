"""Generate zips in the real EVA dataset's layout: for users without the 6 GB set, demo and tests.

    python -m sharding.synth --out data/zips --batches 10 --backgrounds 100 --foregrounds 100

Each ``batch{k}_images.zip`` holds ``bg_jpg/``, ``fg_bg_jpg/``, ``mask_black_jpg/`` and
``depth_fg_bg_jpg/`` exactly as the original does. Foregrounds are split across batches, so the
last batch's foregrounds are never seen in training. Output is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import re
import signal
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from sharding.atomic import TMP_PREFIX, atomic_path
from sharding.scenes import (
    compose,
    depth_map,
    jpeg_bytes,
    procedural_background,
    procedural_foreground,
)
from sharding.shard_format import GEOMETRY
from sharding.signals import StopSignals

# A fixed timestamp keeps zips byte-identical between runs with the same seed.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
# Member compression: stored members are what the build reads fastest (in place, from a memory
# map); deflated is what `zip` and most tools write.
COMPRESSION = {"stored": zipfile.ZIP_STORED, "deflated": zipfile.ZIP_DEFLATED}
# What a run writes in --out, and so all that --overwrite removes.
_BATCH_ZIP = re.compile(r"batch\d+_images\.zip")
_BATCH_TMP = re.compile(rf"{re.escape(TMP_PREFIX)}\d+-batch\d+_images\.zip")


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
    reuse_assets: bool = False
    quality: int = 90
    compression: str = "stored"
    workers: int = 1
    overwrite: bool = False

    def validate(self) -> None:
        """Reject settings that cannot produce a dataset, naming the fix."""
        for name in ("batches", "backgrounds", "foregrounds", "placements", "workers"):
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
        if self.compression not in COMPRESSION:
            raise SynthError(
                f"--compression must be one of {', '.join(COMPRESSION)}, got {self.compression}"
            )

    @property
    def samples_per_batch(self) -> list[int]:
        """Samples in each batch zip: its foregrounds × backgrounds × 2 flips × placements."""
        return [len(fg_ids) * self.backgrounds * 2 * self.placements for fg_ids in self.fg_split()]

    def fg_split(self) -> list[list[int]]:
        """1-based foreground ids for each batch, split as evenly as possible."""
        bounds = np.linspace(0, self.foregrounds, self.batches + 1).round().astype(int)
        return [list(range(lo + 1, hi + 1)) for lo, hi in itertools.pairwise(bounds)]

    def zip_path(self, batch: int) -> Path:
        """Where batch ``batch`` (1-based) is written."""
        return Path(self.out) / f"batch{batch}_images.zip"


class SynthError(Exception):
    """A setting or asset problem the user can fix."""


# --- images ---------------------------------------------------------------------------------


def _asset_files(assets: Path) -> tuple[list[Path], list[Path]]:
    """The background photos (``bg/*.jpg``) and cut-outs (``fg/*.png``) in ``assets``."""
    if not assets.is_dir():
        raise SynthError(f"--assets {assets}: no such directory")
    bg_files = sorted((assets / "bg").glob("*.jpg"))
    fg_files = sorted((assets / "fg").glob("*.png"))
    if not bg_files or not fg_files:
        raise SynthError(f"{assets}: expected bg/*.jpg and fg/*.png (see shared/eva-assets)")
    return bg_files, fg_files


def asset_plan(cfg: SynthConfig, n_bg: int, n_fg: int) -> tuple[list[int], list[int]]:
    """Which photo (0-based, of ``n_bg``) and cut-out (of ``n_fg``) each bg and fg id uses.

    Asking for more than the folder holds is refused unless ``cfg.reuse_assets``; even then the
    last batch's foregrounds use cut-outs that no training batch uses, so they stay unseen.
    """
    where = f"--assets {cfg.assets}"
    hint = "ask for fewer, add files, or pass --reuse-assets to use some more than once"
    if cfg.backgrounds > n_bg and not cfg.reuse_assets:
        raise SynthError(
            f"{where}: --backgrounds {cfg.backgrounds} but bg/ holds {n_bg} photos; {hint}"
        )
    if cfg.foregrounds > n_fg and not cfg.reuse_assets:
        raise SynthError(
            f"{where}: --foregrounds {cfg.foregrounds} but fg/ holds {n_fg} cut-outs; {hint}"
        )
    bg_plan = [i % n_bg for i in range(cfg.backgrounds)]
    if cfg.foregrounds <= n_fg or cfg.batches == 1:  # no reuse, or no training batch to leak into
        return bg_plan, [i % n_fg for i in range(cfg.foregrounds)]
    if n_fg < 2:
        raise SynthError(
            f"{where}: fg/ holds 1 cut-out; reusing it in the test batch would show the test "
            "object in training; add cut-outs"
        )
    n_test_ids = len(cfg.fg_split()[-1])
    # The test batch gets its share of the cut-outs, at least one, and training the rest.
    n_test = min(n_fg - 1, max(1, round(n_fg * n_test_ids / cfg.foregrounds)))
    n_train = n_fg - n_test
    n_train_ids = cfg.foregrounds - n_test_ids
    fg_plan = [i % n_train for i in range(n_train_ids)]
    fg_plan += [n_train + i % n_test for i in range(n_test_ids)]
    return bg_plan, fg_plan


def _open(path: Path, mode: str) -> Image.Image:
    """An asset image, decoded in full, or ``SynthError`` naming the file."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (OSError, ValueError) as e:  # not an image, truncated, unreadable
        raise SynthError(f"{path}: not a readable image ({e})") from None


def _load_assets(assets: Path, cfg: SynthConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Real backgrounds (``bg/*.jpg``) and RGBA cut-outs (``fg/*.png``), as ``asset_plan`` says."""
    bg_files, fg_files = _asset_files(assets)
    bg_plan, fg_plan = asset_plan(cfg, len(bg_files), len(fg_files))
    size = cfg.image_size
    bgs = [np.asarray(_open(bg_files[i], "RGB").resize((size, size))) for i in bg_plan]
    fgs = []
    for i in fg_plan:
        fg = _open(fg_files[i], "RGBA")
        # The original recipe resized cut-outs small before pasting: longer side ~ half the frame.
        scale = (size * 0.5) / max(fg.size)
        fg = fg.resize((max(1, round(fg.width * scale)), max(1, round(fg.height * scale))))
        fgs.append(np.asarray(fg))
    return bgs, fgs


def _write_batch(cfg: SynthConfig, batch: int) -> tuple[str, int]:
    """Write one ``batch{k}_images.zip`` atomically; return its path and sample count."""
    rng = np.random.default_rng([cfg.seed, batch])
    if cfg.assets:
        bgs, fgs = _load_assets(Path(cfg.assets), cfg)
    else:
        scene_rng = np.random.default_rng([cfg.seed, 10_000])  # same scenes in every batch
        bgs = [procedural_background(scene_rng, cfg.image_size) for _ in range(cfg.backgrounds)]
        fgs = [procedural_foreground(scene_rng, cfg.image_size) for _ in range(cfg.foregrounds)]
    horizons = np.random.default_rng([cfg.seed, 20_000]).uniform(0.3, 0.55, cfg.backgrounds)
    compression = COMPRESSION[cfg.compression]

    def encode(rgb: np.ndarray) -> bytes:
        img = rgb if cfg.rgb else np.asarray(Image.fromarray(rgb).convert("L"))
        return jpeg_bytes(img, cfg.quality)

    out = cfg.zip_path(batch)
    count = 0
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression) as zf:

        def put(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = compression
            zf.writestr(info, data)

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
                        fg_bg, mask = compose(bgs[b - 1], fg, x, y)
                        depth = depth_map(
                            horizons[b - 1], mask, y + h - 1, cfg.image_size, cfg.depth_size
                        )
                        stem = f"{f}_{b}_{flip}_{n}"
                        put(f"fg_bg_jpg/fg_bg_{stem}.jpg", encode(fg_bg))
                        for name, single in (
                            (f"mask_black_jpg/bg_mask_{stem}", mask),
                            (f"depth_fg_bg_jpg/depth_fg_bg_{stem}", depth),
                        ):
                            put(f"{name}.jpg", jpeg_bytes(single, cfg.quality))
                        count += 1
                        if count % 64 == 0:
                            _report_progress(64)
    return str(out), count


# --- the run --------------------------------------------------------------------------------

_progress = None  # a shared sample counter, so the bar moves while a batch is being written


def _init_worker(counter) -> None:
    global _progress
    _progress = counter
    # Ctrl-C reaches the whole process group; the parent alone handles it and then terminates
    # the workers (SIGTERM, which must kill them, not run a handler inherited from main).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _report_progress(n: int) -> None:
    if _progress is not None:
        with _progress.get_lock():
            _progress.value += n


def prepare_out(cfg: SynthConfig) -> Path:
    """Create ``--out``, refusing one with content unless ``--overwrite``.

    ``--overwrite`` removes the earlier ``batch*_images.zip`` files only, so two datasets never
    mix; other files are left alone. Temporaries of a killed run are always removed.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SynthError(f"--out {out}: exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    leftovers = [name for name in entries if _BATCH_TMP.fullmatch(name)]
    content = [name for name in entries if name not in leftovers]
    earlier = [name for name in content if _BATCH_ZIP.fullmatch(name)]
    if content and not cfg.overwrite:
        example = (earlier or content)[0]
        raise SynthError(
            f"--out {out}: directory is not empty ({len(content)} entries, e.g. {example}); "
            "pass --overwrite to replace its batch*_images.zip files, or choose another directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in leftovers + earlier:
        (out / name).unlink(missing_ok=True)
    return out


def batch_status(cfg: SynthConfig) -> tuple[list[int], list[int]]:
    """Batches whose zip is in ``--out`` (complete: renamed only when whole), and the others."""
    done = [k for k in range(1, cfg.batches + 1) if cfg.zip_path(k).is_file()]
    return done, [k for k in range(1, cfg.batches + 1) if k not in done]


def _remove_temporaries(out: Path) -> None:
    # A terminated worker skips the atomic writer's own cleanup.
    for tmp in out.glob(f"{TMP_PREFIX}*-batch*_images.zip"):
        tmp.unlink(missing_ok=True)


def generate(cfg: SynthConfig, progress: bool = True) -> list[Path]:
    """Write every batch zip of ``cfg``; return their paths in batch order.

    Raises ``SynthError`` on bad settings or assets before anything is written. On any
    exception, ``KeyboardInterrupt`` included, the workers are terminated at once and no
    temporary file is left; batches finished before it are kept (see ``batch_status``).
    """
    cfg.validate()
    if cfg.assets:
        _load_assets(Path(cfg.assets), cfg)  # every asset problem shows before --out is touched
    out = prepare_out(cfg)
    counter = multiprocessing.Value("q", 0)
    bar = tqdm(
        total=sum(cfg.samples_per_batch),
        unit="sample",
        desc="synth",
        disable=None if progress else True,
    )
    pool = None
    try:
        workers = min(cfg.workers, cfg.batches)
        pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(counter,))
        pending = [pool.apply_async(_write_batch, (cfg, k)) for k in range(1, cfg.batches + 1)]
        while not all(r.ready() for r in pending):
            for r in pending:
                if r.ready() and not r.successful():
                    r.get()  # re-raises the worker's error now, not after the other batches
            time.sleep(0.1)
            bar.update(counter.value - bar.n)
        paths = [Path(r.get()[0]) for r in pending]
        bar.update(bar.total - bar.n)
        pool.close()
    except BaseException:
        with _no_second_interrupt():
            if pool is not None:
                pool.terminate()  # stop mid-batch: nothing is completed after Ctrl-C or an error
                pool.join()
            _remove_temporaries(out)
        raise
    finally:
        bar.close()
    pool.join()
    return paths


@contextlib.contextmanager
def _no_second_interrupt() -> Iterator[None]:
    """Hold off a second Ctrl-C (or kill) while the first is cleaned up (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option has a help string."""
    p = argparse.ArgumentParser(
        prog="python -m sharding.synth",
        description="Write batch{k}_images.zip files in the real EVA dataset's layout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="directory for the zips (new or empty)")
    p.add_argument("--batches", type=int, default=10, help="number of batch zips")
    p.add_argument("--backgrounds", type=int, default=100, help="backgrounds (in every batch)")
    p.add_argument("--foregrounds", type=int, default=100, help="foregrounds, split over batches")
    p.add_argument("--placements", type=int, default=20, help="random placements per fg/bg/flip")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed: the same seed writes the same zips"
    )
    p.add_argument(
        "--image-size", type=int, default=GEOMETRY.image_size, help="bg, fg_bg and mask side"
    )
    p.add_argument("--depth-size", type=int, default=GEOMETRY.depth_size, help="depth map side")
    p.add_argument("--rgb", action="store_true", help="colour JPEGs (the real set is grayscale)")
    p.add_argument(
        "--assets",
        help="real assets instead of generated scenes: DIR/bg/*.jpg photos and DIR/fg/*.png "
        "RGBA cut-outs, at least --backgrounds and --foregrounds of each",
    )
    p.add_argument(
        "--reuse-assets",
        action="store_true",
        help="allow --assets with fewer files than asked for: some are used more than once "
        "(the last batch's cut-outs are still never used in training)",
    )
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument(
        "--compression",
        choices=sorted(COMPRESSION),
        default="stored",
        help="zip member compression: stored (none; the build reads such members in place) "
        "or deflated (what `zip` and most tools write)",
    )
    p.add_argument("--workers", type=int, default=1, help="batches written in parallel")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out, removing its earlier batch*_images.zip files "
        "(other files are kept)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> SynthConfig:
    """Parse the command line into a ``SynthConfig``."""
    return SynthConfig(**vars(build_parser().parse_args(argv)))


def _names(batches: list[int]) -> str:
    return ", ".join(f"batch{k}" for k in batches) or "none"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        cfg.validate()
    except SynthError as e:  # a bad option value: a usage error
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        with StopSignals():  # kill cleans up as Ctrl-C does; a second one is ignored
            paths = generate(cfg)
    except SynthError as e:  # unusable assets or --out
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        done, missing = batch_status(cfg)
        print(
            f"interrupted: complete in {cfg.out}: {_names(done)}; not written: "
            f"{_names(missing)} (temporaries removed); re-run with --overwrite for a full set",
            file=sys.stderr,
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
