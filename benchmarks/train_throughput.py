"""End-to-end training throughput for each available loader, against an in-memory ceiling.

Usage: ``python -m benchmarks.train_throughput --data DIR [--json PATH] [--batches N]
[--warmup N] [--batch-size N] [--widths 16,32,64,128,256] [--num-threads N]
[--device auto|cpu|cuda]``

Each loader (torch, dali-cpu, and dali-gpu when CUDA is there) feeds the training step that
train.py runs (``training.step``: forward, loss, backward and the recipe's optimizer step,
timed by its ``StepTimer`` with a device sync) on the default recipe's model (``UNetConfig``
with ``--widths``: difference input, add skips, context, aux depth heads) and loss, which
the first line and the JSON's ``model`` name; "synthetic" repeats one batch already in
memory, so its samples/s is what the model alone allows. data_wait_share is the fraction of
the wall time spent blocked on the next batch. Each is timed after ``--warmup`` untimed
steps, which pay for the allocator, the pipeline's start-up and the prefetch queue it filled
for free.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import machine_info, missing_dir, write_report
from model import MaskDepthLoss, UNet, UNetConfig
from pipeline import LoaderConfig, LoaderError, build_loader
from training.distributed import DEVICES, DeviceError, Runtime, resolve_device
from training.options import widths_type
from training.recipe import build_optimizer, recipe_values
from training.step import StepTimer, train_step

PROG = "python -m benchmarks.train_throughput"
# Fewer timed steps than this give a figure that is mostly noise: a loader can then time
# faster than the in-memory ceiling.
STEADY_BATCHES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options."""
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--data", required=True, help="dataset dir with manifest.json")
    p.add_argument("--json", help="also write the results here (atomically)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per loader")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed batches per loader before the timed ones"
    )
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    p.add_argument(
        "--widths",
        type=widths_type,
        default=UNetConfig.widths,
        help="UNet channel widths per level, comma-separated",
    )
    p.add_argument("--num-threads", type=int, default=2, help="loader threads (DALI) or workers")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when visible")
    args = p.parse_args(argv)
    if args.batches < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error(
            f"--batches {args.batches} and --batch-size {args.batch_size} must be at least 1, "
            f"--warmup {args.warmup} at least 0"
        )
    return args


def loader_variants(device: torch.device) -> dict[str, tuple[str, str]]:
    """name -> (backend, batch device) for each loader this machine can run."""
    variants = {"torch": ("torch", "cpu"), "dali-cpu": ("dali", "cpu")}
    if device.type == "cuda":
        variants["dali-gpu"] = ("dali", str(device))
    return variants


def endless(loader: Any) -> Iterator[dict[str, Any]]:
    """Batches from epoch 0, 1, ... so a short split can feed any number of steps."""
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def time_steps(
    batches: Iterator[dict[str, Any]],
    count: int,
    rt: Runtime,
    channels: int,
    widths: tuple[int, ...],
    warmup: int = 3,
) -> dict[str, float]:
    """Samples/s and data-wait share of ``count`` training steps after ``warmup`` untimed ones."""
    torch.manual_seed(0)
    model = UNet(model_config(channels, widths)).to(rt.device, memory_format=rt.memory_format)
    loss_fn = MaskDepthLoss().to(rt.device)  # the default recipe's weights
    optimizer, _ = build_optimizer(recipe_values(), model)
    # The first steps pay for the allocator, the pipeline's start-up, and are fed from a
    # prefetch queue that filled for free: none of that is the steady rate.
    for _ in range(warmup):
        train_step(model, loss_fn, optimizer, next(batches), rt)
    rt.sync()
    timer, start = StepTimer(rt), time.perf_counter()
    for _ in range(count):
        batch = timer.next_batch(batches)
        timer.step_done(train_step(model, loss_fn, optimizer, batch, rt).samples)
    data_s = timer.data_s  # waits for the queued steps, so the wall time below includes them
    wall = time.perf_counter() - start
    return {
        "samples_per_s": timer.samples / wall,
        "data_wait_share": data_s / wall,
        "timed_batches": count,
        "warmup_batches": warmup,
    }


def model_config(channels: int, widths: tuple[int, ...]) -> UNetConfig:
    """The default recipe's model for ``channels`` per image, at ``widths``."""
    return UNetConfig(in_channels=channels, widths=widths)


def synthetic(batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The same batch forever: no decoding, no augmentation, no copies."""
    while True:
        yield batch


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every loader and the synthetic ceiling; returns the JSON payload."""
    device = resolve_device(args.device)
    rt = Runtime(device=device, amp=device.type == "cuda", memory_format=torch.channels_last)
    results: dict[str, dict[str, float]] = {}
    first_batch, model = None, None
    for name, (backend, device) in loader_variants(rt.device).items():
        cfg = LoaderConfig(
            backend=backend, device=device, batch_size=args.batch_size, num_threads=args.num_threads
        )
        try:
            loader = build_loader(args.data, "train", cfg)
        except (LoaderError, ImportError) as e:
            print(f"{name}: skipped ({str(e).splitlines()[0]})")
            continue
        batches = endless(loader)
        if model is None:
            model = model_config(loader.channels, args.widths)
            own = "" if args.widths == UNetConfig().widths else " at these --widths"
            print(f"model: {model.describe()} (the default recipe's{own})", flush=True)
        results[name] = time_steps(
            batches, args.batches, rt, loader.channels, args.widths, args.warmup
        )
        if first_batch is None:  # cloned: DALI reuses its output buffers for later batches
            first_batch = {
                k: v.clone() if torch.is_tensor(v) else v for k, v in next(batches).items()
            }
        print(f"{name}: {results[name]['samples_per_s']:.1f} samples/s")
    if first_batch is not None:
        channels = first_batch["bg"].shape[1]
        in_memory = {
            k: v.to(rt.device) if torch.is_tensor(v) else v for k, v in first_batch.items()
        }
        results["synthetic"] = time_steps(
            synthetic(in_memory), args.batches, rt, channels, args.widths, args.warmup
        )
    described = {"description": model.describe(), **asdict(model)} if model else None
    return {
        "machine": machine_info(rt.device),
        "config": vars(args),
        "model": described,
        "results": results,
    }


def print_table(results: dict[str, dict[str, float]]) -> None:
    """Loader, samples/s, data-wait share and the share of the in-memory ceiling."""
    ceiling = results.get("synthetic", {}).get("samples_per_s")
    print(f"{'loader':<10} {'samples/s':>10} {'data wait':>10} {'of ceiling':>11}")
    for name, r in results.items():
        share = f"{r['samples_per_s'] / ceiling:.0%}" if ceiling else "-"
        print(f"{name:<10} {r['samples_per_s']:>10.1f} {r['data_wait_share']:>10.0%} {share:>11}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = parse_args(argv)
    if not (Path(args.data) / "manifest.json").is_file():
        print(f"{PROG}: error: no manifest.json in {args.data}", file=sys.stderr)
        return 1
    if problem := missing_dir(args.json):
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 1
    if args.batches < STEADY_BATCHES:
        print(
            f"note: {args.batches} timed batches per loader give noisy figures (a loader may "
            f"time above its ceiling); use --batches {STEADY_BATCHES} or more to compare"
        )
    try:
        payload = run(args)
    except DeviceError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print_table(payload["results"])
    write_report(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
