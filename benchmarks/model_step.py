"""Time one training step of the UNet in each memory layout, dtype and compile mode.

Usage: ``python -m benchmarks.model_step [--device cpu|cuda] [--batch-size N] [--steps N]
[--warmup N] [--compile] [--json PATH] [--overwrite]``

The model is the default recipe's (``UNetConfig()``: its widths, difference input, add
skips, context blocks and the aux depth heads, which training runs), and a step is the one
train.py runs (``training.step.train_step``: forward, MaskDepthLoss with the recipe's
weights, backward, the recipe's AdamW) on random tensors, so the figures measure the model
alone, with no data loading; the first output line and the JSON say which model. bf16
autocast is timed on CUDA only. samples/s comes from the median step time; the JSON also
records the mean and the 1-minute load average, since other processes on a shared machine
skew CPU timings. ``--compile`` also times torch.compile (eager against compiled, in each
dtype) in channels_last, the layout train.py runs; its first steps compile for minutes on a
CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.report import machine_info, missing_dir, write_report
from model import MaskDepthLoss, UNet, UNetConfig
from training.distributed import DeviceError, Runtime, resolve_device
from training.recipe import build_optimizer, recipe_values
from training.step import train_step

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
_PROG = "python -m benchmarks.model_step"


def make_batch(cfg: UNetConfig, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A random batch of the shapes the pipeline delivers (bg, fg_bg, mask, depth)."""
    generator = torch.Generator().manual_seed(0)
    image = (batch_size, cfg.in_channels, cfg.mask_size, cfg.mask_size)
    batch = {
        "bg": torch.rand(image, generator=generator),
        "fg_bg": torch.rand(image, generator=generator),
        "mask": torch.rand(batch_size, 1, *image[2:], generator=generator) > 0.5,
        "depth": torch.rand(batch_size, 1, cfg.depth_size, cfg.depth_size, generator=generator),
    }
    return {k: v.float().to(device) for k, v in batch.items()}


def time_config(
    layout: str,
    dtype: str,
    compiled: bool,
    device: torch.device,
    batch_size: int,
    steps: int,
    warmup: int,
) -> dict:
    """Samples/s (and CUDA peak memory) of train.py's training step in one configuration."""
    torch.manual_seed(0)
    memory_format = LAYOUTS[layout]
    cfg = model_config(layout)
    model = UNet(cfg).to(device, memory_format=memory_format)
    loss_fn = MaskDepthLoss().to(device)  # the default recipe's weights
    optimizer, _ = build_optimizer(recipe_values(), model)
    rt = Runtime(device=device, amp=dtype == "bf16", memory_format=memory_format)
    batch = make_batch(cfg, batch_size, device)
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        train_step(forward, loss_fn, optimizer, batch, rt)

    def sync() -> None:
        # CUDA kernels are asynchronous: without a sync the clock would stop early.
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Warm-up also absorbs torch.compile's first-call compilation and cuDNN autotuning.
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        step_seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    # Timed per step so the median can shrug off steps slowed by other processes on a shared
    # machine; the mean is kept for comparison.
    median = statistics.median(step_seconds)
    mean = statistics.fmean(step_seconds)
    return {
        "layout": layout,
        "dtype": dtype,
        "compile": compiled,
        "samples_per_s": batch_size / median,
        "samples_per_s_mean": batch_size / mean,
        "step_ms_median": 1000 * median,
        "peak_mem_bytes": peak,
    }


def model_config(layout: str = "channels_last") -> UNetConfig:
    """The default recipe's model, the one timed."""
    return UNetConfig(channels_last=layout == "channels_last")


def configurations(device: torch.device, compile_too: bool) -> list[tuple[str, str, bool]]:
    """``(layout, dtype, compiled)`` to time: eager in every layout and dtype, compiled in
    channels_last (train.py's layout) in every dtype."""
    dtypes = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    eager = [(layout, dtype, False) for dtype in dtypes for layout in LAYOUTS]
    return eager + [("channels_last", dtype, True) for dtype in dtypes if compile_too]


def format_table(results: list[dict]) -> str:
    """Fixed-width table of the results."""
    header = (
        f"{'layout':<15}{'dtype':<7}{'compile':<9}{'samples/s':>11}{'(mean)':>9}{'peak MiB':>10}"
    )
    lines = [header]
    for row in results:
        compile_mode = "yes" if row["compile"] else "no"
        if row.get("error"):
            lines.append(f"{row['layout']:<15}{row['dtype']:<7}{compile_mode:<9}  failed")
            continue
        peak = row["peak_mem_bytes"]
        peak_text = f"{peak / 2**20:.0f}" if peak is not None else "-"
        lines.append(
            f"{row['layout']:<15}{row['dtype']:<7}{compile_mode:<9}"
            f"{row['samples_per_s']:>11.1f}{row['samples_per_s_mean']:>9.1f}{peak_text:>10}"
        )
    return "\n".join(lines)


class _OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line on stderr, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = _OneLineParser(prog=_PROG, description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to time")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also time torch.compile; compiling takes minutes on a CPU (default: off)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        parser.error(
            f"--batch-size={args.batch_size} and --steps={args.steps} must be >= 1 "
            f"and --warmup={args.warmup} >= 0"
        )
    return args


def environment_problem(args: argparse.Namespace) -> str | None:
    """Why this machine or file system cannot run ``args``, or None."""
    try:
        resolve_device(args.device)
    except DeviceError as e:
        return str(e)
    if args.json is not None and args.json.exists() and not args.overwrite:
        return f"{args.json} exists; pass --overwrite to replace it"
    return missing_dir(args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """Time every configuration, print a table, optionally write JSON."""
    args = parse_args(argv)
    problem = environment_problem(args)
    if problem:
        print(f"{_PROG}: error: {problem}", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    print(f"model: {model_config().describe()} (the default recipe's)", flush=True)
    if device.type == "cpu":
        print("note: bf16 autocast is timed on CUDA only; skipped on CPU")
    results = []
    for layout, dtype, compiled in configurations(device, args.compile):
        # Progress, since one configuration can take minutes (compiling, a busy CPU).
        compiling = " (compiling first: minutes on a CPU)" if compiled else ""
        print(f"timing {layout} {dtype} compile={compiled}{compiling} ...", flush=True)
        try:
            row = time_config(
                layout, dtype, compiled, device, args.batch_size, args.steps, args.warmup
            )
        # Broad on purpose: Inductor fails in many ways (no compiler, unsupported op,
        # backend crash) and one failed mode should not lose the eager figures.
        except Exception as err:
            if not compiled:
                raise
            first_line = (str(err).strip().splitlines() or [""])[0]
            reason = f"{type(err).__name__}: {first_line}"
            print(f"torch.compile failed ({layout}, {dtype}): {reason}")
            row = {
                "layout": layout,
                "dtype": dtype,
                "compile": True,
                "samples_per_s": None,
                "samples_per_s_mean": None,
                "step_ms_median": None,
                "peak_mem_bytes": None,
                "error": reason,
            }
        results.append(row)
        print(f"measured {layout} {dtype} compile={compiled}", flush=True)
    print(format_table(results))
    timed = [row for row in results if row["samples_per_s"] is not None]
    fastest = max(timed, key=lambda row: row["samples_per_s"])
    print(
        f"fastest: {fastest['layout']} {fastest['dtype']} compile={fastest['compile']} "
        f"at {fastest['samples_per_s']:.1f} samples/s (batch {args.batch_size}, {device})"
    )
    if args.json is not None:
        payload = {
            "machine": machine_info(device),
            "settings": {
                "batch_size": args.batch_size,
                "steps": args.steps,
                "warmup": args.warmup,
                "model": {
                    "recipe": "default",
                    "description": model_config().describe(),
                    **asdict(model_config()),
                },
                "step": "training.step.train_step with the default recipe's loss and optimizer",
            },
            "results": results,
            "fastest": {k: fastest[k] for k in ("layout", "dtype", "compile", "samples_per_s")},
        }
        write_report(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
