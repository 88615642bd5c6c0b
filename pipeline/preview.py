"""Save a picture of exactly what the loader feeds the model.

    python -m pipeline.preview --data data/shards --out grid.png [--split train] [--n 8]
        [--augment-in auto|dali|torch]

One row per sample: bg, fg_bg, mask, depth (depth scaled up to the image size), after
augmentation as configured, un-normalised with ``denormalize``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from PIL import Image

from pipeline import LoaderConfig, LoaderError, build_loader, denormalize
from pipeline.cache import CACHE_DIR_HELP
from pipeline.config import AUGMENT_IN
from pipeline.grid import compose, save_png, to_pil

COLUMNS = ("bg", "fg_bg", "mask", "depth")


def render_grid(batch: dict, cfg: LoaderConfig, n: int) -> Image.Image:
    """Tile the first n samples of a batch into one RGB image with a header row."""
    size = cfg.image_size
    columns = (
        denormalize(batch["bg"][:n], cfg),
        denormalize(batch["fg_bg"][:n], cfg),
        batch["mask"][:n],
        # nearest keeps the depth map's real resolution visible
        torch.nn.functional.interpolate(batch["depth"][:n].float(), size=(size, size)),
    )
    rows = [[to_pil(column[i]) for column in columns] for i in range(columns[0].shape[0])]
    return compose(rows, COLUMNS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.preview",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="shard directory or shard URL")
    parser.add_argument(
        "--out", required=True, type=Path, help="PNG to write; its directory must exist"
    )
    parser.add_argument(
        "--split",
        default="train",
        choices=("train", "test"),
        help="which split to show; only train is augmented",
    )
    parser.add_argument(
        "--loader",
        default="auto",
        choices=("auto", "dali", "torch"),
        help="loader backend; auto: DALI when installed",
    )
    parser.add_argument("--n", type=int, default=8, help="samples to show (one batch)")
    parser.add_argument("--epoch", type=int, default=0, help="epoch whose shuffle to show")
    parser.add_argument("--seed", type=int, default=0, help="loader seed (shuffle, augmentation)")
    parser.add_argument("--no-augment", action="store_true", help="show train samples unaugmented")
    parser.add_argument(
        "--augment-targets", action="store_true", help="jitter and noise mask and depth too"
    )
    parser.add_argument("--device", default="cpu", help="loader device: cpu, cuda or cuda:N")
    parser.add_argument(
        "--augment-in",
        default="auto",
        choices=AUGMENT_IN,
        help="finish batches in the DALI graph or in torch; auto: the graph on CUDA only",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--cache-dir",
        help=CACHE_DIR_HELP,
    )
    return parser.parse_args(argv)


def used_config(cfg: LoaderConfig, loader) -> LoaderConfig:
    """``cfg`` with what the loader resolved: the backend, and augmentation for this split."""
    return replace(
        cfg,
        backend=loader.backend,
        augment=loader.augment,
        augment_targets=cfg.augment_targets and loader.augment,
        augment_in=loader.augment_in,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry: the grid PNG, or one line on stderr and exit status 1."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.n < 1:
        print(f"error: --n {args.n} must be at least 1", file=sys.stderr)
        return 2
    if args.out.exists() and not args.overwrite:
        print(f"error: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    if not args.out.parent.is_dir():
        print(
            f"error: the directory of --out {args.out} does not exist; create it first",
            file=sys.stderr,
        )
        return 1
    try:
        cfg = LoaderConfig(
            backend=args.loader,
            device=args.device,
            batch_size=args.n,
            seed=args.seed,
            augment=not args.no_augment,
            augment_targets=args.augment_targets,
            augment_in=args.augment_in,
            rank=0,
            world_size=1,
            cache_dir=args.cache_dir,
        )
        loader = build_loader(args.data, args.split, cfg)
        print(json.dumps(asdict(used_config(cfg, loader)), sort_keys=True))
        batch = next(iter(loader.epoch(args.epoch)))
    except LoaderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        save_png(render_grid(batch, cfg, args.n), args.out)
    except OSError as exc:
        print(f"error: {args.out}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {min(args.n, len(batch['key']))} samples from {loader!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
