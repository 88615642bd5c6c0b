"""Check every GPU path on a machine with one CUDA GPU, in about five minutes: `make gpu-check`.

    make gpu-check      # .venv/bin/python if there is one, else python3; PYTHON=... picks another
    python -m benchmarks.gpu_check --out gpu-check

It uses the active Python as it is: no venv, no install, no network. Without torch, CUDA or
DALI it stops at once with one line naming what is missing (exit 1). With them it:

1. generates a dataset of about 20,000 grey samples and one of about 5,000 RGB samples
   (``sharding.synth`` -> ``sharding.build``);
2. runs the ``gpu``-marked tests (``pytest -m gpu``);
3. times the loaders (``benchmarks.loaders``): dali-gpu with augmentation in DALI and in
   torch, and the GPU decode ceiling (DALI mixed decode alone), grey and RGB, at batch 512;
   grey again with ``hw_decoder_load`` 0 and 1 (the default, 0.65, is the first run);
   and the CPU stage of the GPU graph (``benchmarks.cpu_stage``);
4. times the model step (``benchmarks.model_step --device cuda``: fp32 and bf16,
   channels_last and contiguous, eager and compiled);
5. times end-to-end training steps per loader (``benchmarks.train_throughput`` on cuda);
6. trains one epoch with ``train.py``, which writes ``gpu_report.json`` and
   ``memory_layers.csv``.

Everything lands in ``--out``: one log and one JSON per step, and ``summary.json`` with each
step's exit code, wall time and headline figures, and the GPU train graph's operators by
device (``cpu_operators``). Exit 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sharding.atomic import write_json

ROOT = Path(__file__).resolve().parent.parent


class GpuCheckError(Exception):
    """Something the check needs is missing; the message names it."""


def importable(name: str) -> bool:
    """Whether ``import name`` would find a module; a missing parent package counts as missing."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def require_gpu_stack() -> dict[str, str]:
    """Versions of torch (with CUDA) and DALI (with CUDA), or the one thing that is missing."""
    if not importable("torch"):
        raise GpuCheckError(
            f"no torch: {sys.executable} cannot import torch; install the CUDA build of "
            "torch==2.13.0 into it (README, GPU set-up), or name a Python that has it: "
            "PYTHON=/path/to/python make gpu-check"
        )
    import torch

    if not torch.cuda.is_available():
        raise GpuCheckError(
            f"no CUDA device: torch {torch.__version__} (built for CUDA "
            f"{torch.version.cuda or 'none'}) sees no GPU; run this on a machine with one"
        )
    if not importable("nvidia.dali"):
        raise GpuCheckError(
            f"no DALI: nvidia.dali is not importable in {sys.executable}; install the wheel for "
            f"your CUDA major version (this torch's: {torch.version.cuda}): nvidia-dali-cuda120 "
            "for CUDA 12.x, nvidia-dali-cuda130 for CUDA 13.x"
        )
    import nvidia.dali as dali

    return {
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "gpu": torch.cuda.get_device_name(0),
        "dali": dali.__version__,
    }


def loaders_step(py: str, data: Path, json_path: Path, batches: str, *extra: str) -> list[str]:
    """benchmarks.loaders: dali-gpu (augmented in DALI and in torch) against the GPU decode
    ceiling, at batch 512."""
    return [
        py, "-m", "benchmarks.loaders", "--data", str(data), "--json", str(json_path),
        "--loaders", "dali-gpu", "decode-ceiling", "--augment-in", "dali", "--both-augment-in",
        "--batch-size", "512", "--batches", batches, "--rounds", "3", "--no-progress", *extra,
    ]  # fmt: skip


def steps(
    out: Path, data: Path, py: str, quick: bool, rgb: Path | None = None
) -> list[tuple[str, list[str], int]]:
    """(name, argv, timeout_s) for every check after the data is built."""
    batches = "5" if quick else "20"
    rgb = rgb or data
    cpu_stage = [py, "-m", "benchmarks.cpu_stage", "--data", str(data), "--rounds", "3"]
    return [
        ("pytest-gpu", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], 120),
        ("loaders", loaders_step(py, data, out / "loaders.json", batches), 150),
        ("loaders-rgb", loaders_step(py, rgb, out / "loaders_rgb.json", batches), 150),
        *(
            (
                f"loaders-hw-{load}",
                loaders_step(
                    py, data, out / f"loaders_hw_{load}.json", batches, "--hw-decoder-load", load
                ),
                120,
            )
            for load in ("0", "1")
        ),
        ("cpu-stage", [*cpu_stage, "--json", str(out / "cpu_stage.json")], 120),
        (
            "model-step",
            [
                py,
                "-m",
                "benchmarks.model_step",
                "--device",
                "cuda",
                "--batch-size",
                "256",
                "--steps",
                "20",
                "--warmup",
                "5",
                "--compile",
                "--json",
                str(out / "model_step.json"),
            ],
            240,
        ),
        (
            "train-throughput",
            [
                py,
                "-m",
                "benchmarks.train_throughput",
                "--data",
                str(data),
                "--device",
                "cuda",
                "--batch-size",
                "256",
                "--batches",
                batches,
                "--json",
                str(out / "train_throughput.json"),
            ],
            120,
        ),
        (
            "train-1-epoch",
            [
                py,
                "train.py",
                "--data",
                str(data),
                "--out",
                str(out / "run"),
                "--overwrite",
                "--epochs",
                "1",
                "--batch-size",
                "100",
                "--device",
                "cuda",
                "--log-interval",
                "50",
            ],
            150,
        ),
    ]


def run_step(name: str, argv: list[str], timeout: int, out: Path) -> dict[str, Any]:
    """Run one step with its output in ``out/<name>.log``; never raises for a failed step."""
    log_path = out / f"{name}.log"
    print(f"== {name}: {' '.join(argv)}", flush=True)
    tic = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(
                argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - tic
    tail = log_path.read_text(errors="replace").splitlines()[-3:]
    print(f"   {name}: rc={rc} in {wall:.1f} s; " + " | ".join(tail), flush=True)
    return {"argv": argv, "rc": rc, "wall_s": round(wall, 2), "log": log_path.name}


def headline(out: Path) -> dict[str, Any]:
    """The figures RESULTS.md quotes, read from the steps' JSON files where they exist."""
    figures: dict[str, Any] = {}
    names = ("loaders", "loaders_rgb", "loaders_hw_0", "loaders_hw_1", "cpu_stage")
    for name in (*names, "model_step", "train_throughput"):
        path = out / f"{name}.json"
        if path.is_file():
            figures[name] = json.loads(path.read_text())
    report = out / "run" / "gpu_report.json"
    if report.is_file():
        figures["gpu_report"] = json.loads(report.read_text())
    metrics = out / "run" / "metrics.json"
    if metrics.is_file():
        history = json.loads(metrics.read_text()).get("history", [])
        figures["train_epoch"] = history[-1]["timing"] if history else None
    figures["memory_layers_csv"] = (out / "run" / "memory_layers.csv").is_file()
    return figures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("gpu-check"), help="output directory")
    p.add_argument(
        "--work", type=Path, help="where the generated zips and shards go (default: OUT/work)"
    )
    p.add_argument("--samples", type=int, default=20_000, help="about this many samples")
    p.add_argument("--quick", action="store_true", help="fewer timed batches")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier gpu-check's files in --out"
    )
    return p.parse_args(argv)


def earlier_outputs(out: Path) -> list[Path]:
    """What an earlier gpu-check left in ``out``; ``--overwrite`` removes these and no more."""
    names = {"synth", "build", "synth-rgb", "build-rgb"}
    names |= {name for name, _, _ in steps(out, out, "", False, None)}
    own = {f"{name}.log" for name in names}
    own |= {"summary.json", "loaders.json", "model_step.json", "train_throughput.json"}
    own |= {"loaders_rgb.json", "loaders_hw_0.json", "loaders_hw_1.json", "cpu_stage.json"}
    own |= {"run", "work"}
    return sorted(p for p in out.iterdir() if p.name in own) if out.is_dir() else []


def remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def cpu_operators() -> dict[str, Any]:
    """The GPU train graph's operators by device, grey and RGB, counted from DALI's graph."""
    from benchmarks.cpu_stage import graph_counts

    sizes = {"bg": (160, 160), "fg_bg": (160, 160), "mask": (160, 160), "depth": (80, 80)}
    try:
        return {name: graph_counts(c, sizes) for name, c in (("grey", 1), ("rgb", 3))}
    except Exception as e:  # a summary is written whatever happened; the count says why not
        return {"error": f"{type(e).__name__}: {e}"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        versions = require_gpu_stack()
        earlier = earlier_outputs(args.out)
        if earlier and not args.overwrite:
            raise GpuCheckError(
                f"{args.out} is not empty: it holds an earlier gpu-check; pass --overwrite "
                "or another --out"
            )
    except GpuCheckError as e:
        print(f"gpu-check: error: {e}", file=sys.stderr)
        return 1
    remove(earlier)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    work = (args.work or out / "work").resolve()
    # The dataset is regenerated on every run; only the folders made for it are replaced.
    made = ("zips", "shards", "zips-rgb", "shards-rgb")
    remove([work / name for name in made if (work / name).exists()])
    py = sys.executable
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # 16 batches (15 train, 1 test), 2 foregrounds each, 2 flips: 64 samples per background
    # and placement; up to 50 backgrounds, then more placements.
    per_background = max(1, args.samples // 64)
    backgrounds = min(50, per_background)
    placements = max(1, round(per_background / backgrounds))
    started = time.perf_counter()
    results: dict[str, Any] = {}
    synth = [
        py,
        "-m",
        "sharding.synth",
        "--out",
        str(work / "zips"),
        "--batches",
        "16",
        "--backgrounds",
        str(backgrounds),
        "--foregrounds",
        "32",
        "--placements",
        str(placements),
        "--workers",
        str(min(16, cpus or 1)),
    ]
    results["synth"] = run_step("synth", synth, 240, out)
    zips = sorted(str(p) for p in (work / "zips").glob("batch*_images.zip"))
    build = [py, "-m", "sharding.build", *zips, "--out", str(work / "shards"), "--overwrite"]
    if results["synth"]["rc"] == 0:
        results["build"] = run_step("build", build, 240, out)
    # A quarter as many RGB samples: the colour jitter's parameters are the RGB path's cost.
    rgb_synth = [*synth, "--rgb", "--placements", str(max(1, placements // 4))]
    rgb_synth[rgb_synth.index("--out") + 1] = str(work / "zips-rgb")
    results["synth-rgb"] = run_step("synth-rgb", rgb_synth, 240, out)
    rgb_zips = sorted(str(p) for p in (work / "zips-rgb").glob("batch*_images.zip"))
    rgb_shards = work / "shards-rgb"
    if results["synth-rgb"]["rc"] == 0:
        rgb_build = [py, "-m", "sharding.build", *rgb_zips, "--out", str(rgb_shards)]
        results["build-rgb"] = run_step("build-rgb", [*rgb_build, "--overwrite"], 240, out)
    if all(r["rc"] == 0 for r in results.values()):
        for name, argv_, timeout in steps(out, work / "shards", py, args.quick, rgb_shards):
            results[name] = run_step(name, argv_, timeout, out)
    from benchmarks.report import load_average

    summary = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {**versions, "platform": platform.platform(), "cpus": cpus},
        "load_average": load_average(),
        "total_s": round(time.perf_counter() - started, 1),
        "steps": results,
        "cpu_operators": cpu_operators(),
        "figures": headline(out),
    }
    write_json(out / "summary.json", summary)
    failed = [name for name, r in results.items() if r["rc"] != 0]
    print(
        f"gpu-check: {len(results) - len(failed)}/{len(results)} steps passed in "
        f"{summary['total_s']} s; summary: {out / 'summary.json'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
