"""Time what each epoch's start costs a DALI loader: a new plan and a reset, never a rebuild.

    python -m benchmarks.dali_startup --data data/shards [--epochs 4] [--batch-size 100]
        [--device cpu|cuda] [--augment-in auto|dali|torch] [--json out.json]

Each split's pipeline is built once per loader (``pipeline.dali``); a new epoch hands it a new
order and resets it, and ``builds`` counts the pipelines built. For every epoch of each split
this records
the seconds from asking for the epoch to its first batch and the median seconds per later
batch; their difference is what the epoch start costs over a steady batch. Epoch 0 also pays
for the first import and DALI's one-off start-up, so the summary uses the later epochs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.report import load_average, machine_info, missing_dir, write_report
from pipeline import LoaderConfig, LoaderError, build_loader
from pipeline.config import AUGMENT_IN, resolve_threads
from pipeline.loader import dali_available

PROG = "python -m benchmarks.dali_startup"


def time_epoch(loader, epoch: int, device: str) -> dict:
    """Seconds to the first batch, and the median seconds per later batch, of one epoch."""
    start = time.perf_counter()
    batches = loader.epoch(epoch)
    next(batches)
    if device != "cpu":
        torch.cuda.synchronize()  # count work finished, not work queued
    first = time.perf_counter() - start
    steps, last = [], time.perf_counter()
    for _ in batches:
        if device != "cpu":
            torch.cuda.synchronize()
        now = time.perf_counter()
        steps.append(now - last)
        last = now
    batch = statistics.median(steps) if steps else None
    return {
        "first_batch_s": first,
        "median_batch_s": batch,
        "start_overhead_s": first - batch if batch is not None else None,
        "batches": len(steps) + 1,
    }


def run(args: argparse.Namespace) -> dict:
    cfg = LoaderConfig(
        backend="dali",
        device=args.device,
        batch_size=args.batch_size,
        num_threads=args.threads,
        augment_in=args.augment_in,
        rank=0,
        world_size=1,
    )
    load_at_start = load_average()
    from pipeline.dali import DaliPipeline

    splits = {}
    for split in ("train", "test"):
        built = DaliPipeline.builds
        loader = build_loader(args.data, split, cfg)
        epochs = [time_epoch(loader, e, args.device) for e in range(args.epochs)]
        later = [e["start_overhead_s"] for e in epochs[1:] if e["start_overhead_s"] is not None]
        builds = DaliPipeline.builds - built
        splits[split] = {
            "pipeline": "built once, reset" if builds == 1 else f"built {builds} times",
            "builds": builds,
            "augment_in": loader.augment_in,
            "samples": loader.num_samples,
            "epochs": epochs,
            "median_start_overhead_s_after_epoch_0": statistics.median(later) if later else None,
        }
    return {
        "machine": {
            **machine_info(),
            "dali_threads": resolve_threads(cfg),
            "load_average_at_start": load_at_start,
        },
        "data": {"path": str(args.data), "batch_size": args.batch_size, "device": args.device},
        "splits": splits,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="shard directory (with manifest.json)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per split (at least 2)")
    parser.add_argument("--batch-size", type=int, default=100, help="samples per batch")
    parser.add_argument("--threads", type=int, default=None, help="DALI threads; default: auto")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--augment-in",
        default="auto",
        choices=AUGMENT_IN,
        help="finish batches in the DALI graph or in torch; auto: the graph on CUDA only",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.epochs < 2 or args.batch_size < 1:
        print(
            f"{PROG}: error: --epochs must be at least 2 and --batch-size at least 1",
            file=sys.stderr,
        )
        return 2
    if not dali_available():
        print(
            f"{PROG}: error: nvidia.dali is not installed; this benchmark times DALI",
            file=sys.stderr,
        )
        return 1
    if problem := missing_dir(args.json):
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 1
    try:
        report = run(args)
    except LoaderError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    for split, result in report["splits"].items():
        overhead = result["median_start_overhead_s_after_epoch_0"]
        firsts = ", ".join(f"{e['first_batch_s']:.3f}" for e in result["epochs"])
        text = f"{overhead:.3f} s" if overhead is not None else "-"
        print(
            f"{split:5s} ({result['pipeline']}): epoch start costs {text} over a steady batch "
            f"(median of epochs 1+); first batch per epoch: {firsts} s"
        )
    print(json.dumps(report["machine"]))
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
