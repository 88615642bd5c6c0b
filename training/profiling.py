"""Profilers a run can turn on: torch.profiler traces for TensorBoard (``--profile torch``)
and cProfile stats of the host side."""

from __future__ import annotations

import cProfile
import io
import pstats
from pathlib import Path
from typing import Any

import torch

from sharding.atomic import atomic_path


def torch_profiler(device: torch.device, trace_dir: Path) -> Any:
    """A started torch.profiler that records a few steps into ``trace_dir`` for TensorBoard.

    ``tensorboard_trace_handler`` writes ``HOST_PID.TIME.pt.trace.json`` there: give it the
    TensorBoard log directory and torch-tb-profiler shows it; Perfetto opens it as it is.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(trace_dir)),
        record_shapes=True,
    )
    profiler.start()  # stepped per training step across epochs; the schedule keeps it short
    return profiler


def write_cprofile(profiler: cProfile.Profile, path: Path) -> str:
    """Stop ``profiler`` and save its stats to ``path``; returns the top entries by cumulative
    time and how to view the file."""
    profiler.disable()
    with atomic_path(path) as tmp:
        profiler.dump_stats(tmp)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(15)
    hint = f"cProfile stats: {path} (view with `python -m pstats {path}` or snakeviz)"
    return f"{text.getvalue()}\n{hint}"
