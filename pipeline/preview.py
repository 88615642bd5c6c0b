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
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from pipeline import LoaderConfig, LoaderError, build_loader, denormalize
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
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="shard directory or shard URL")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--loader", default="auto", choices=("auto", "dali", "torch"))
    parser.add_argument("--n", type=int, default=8, help="samples to show")
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--augment-targets", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--augment-in",
        default="auto",
        choices=AUGMENT_IN,
        help="finish batches in the DALI graph or in torch; auto: the graph on CUDA only",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.n < 1:
        print(f"error: --n {args.n} must be at least 1", file=sys.stderr)
        return 2
    if args.out.exists() and not args.overwrite:
        print(f"error: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
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
            shard_id=0,
            num_shards=1,
        )
        print(json.dumps(asdict(cfg), sort_keys=True))
        loader = build_loader(args.data, args.split, cfg)
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
