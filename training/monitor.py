"""What a run measures about itself: per-layer CUDA memory, NVML samples, profilers.

:func:`gpu_monitor` is the one context manager a training loop needs: it starts the
per-layer memory recorder and the NVML sampler (CUDA, rank 0) and the torch profiler
(``--profile torch``), steps them with the loop, writes memory_layers.csv, gpu_report.json
and the trace on success, and always stops them, on errors too.

The readings come in as plain functions, so the bookkeeping runs on CPU in tests with
deterministic fake readings; :func:`cuda_memory_readers` and :func:`nvml_reader` give the
real ones. ``pynvml`` is imported only inside :func:`nvml_reader`.

The parts live in their own modules: :mod:`training.gpu_memory` (layer hooks, CUDA memory
readers), :mod:`training.nvml` (the NVML sampler) and :mod:`training.profiling` (torch.profiler,
cProfile); their public names are importable from here too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharding.atomic import write_json
from training.gpu_memory import (
    MEMORY_COLUMNS,
    GpuUnavailable,
    LayerMemoryRecorder,
    cuda_memory_readers,
)
from training.nvml import GpuSampler, NvmlReading, nvml_handle, nvml_reader
from training.profiling import torch_profiler, write_cprofile

__all__ = [
    "MEMORY_COLUMNS",
    "MEMORY_STEPS",
    "GpuMonitor",
    "GpuSampler",
    "GpuUnavailable",
    "LayerMemoryRecorder",
    "NvmlReading",
    "cuda_memory_readers",
    "gpu_monitor",
    "nvml_handle",
    "nvml_reader",
    "torch_profiler",
    "write_cprofile",
]

log = logging.getLogger(__name__)

# A few steps show the per-layer memory pattern; recording more only costs time.
MEMORY_STEPS = 3


class GpuMonitor:
    """The per-step side of :func:`gpu_monitor`: step the profiler, detach the memory hooks
    after :data:`MEMORY_STEPS`, send NVML readings to TensorBoard at log steps."""

    def __init__(
        self,
        recorder: LayerMemoryRecorder | None = None,
        sampler: GpuSampler | None = None,
        profiler: Any = None,
        logger: Any = None,
        log_interval: int = 1,
    ) -> None:
        self.recorder, self.sampler, self.profiler = recorder, sampler, profiler
        self.logger, self.log_interval = logger, log_interval
        self.steps = 0

    def step(self, step: int) -> None:
        """Call after every training step; ``step`` counts from 0 within the epoch."""
        self.steps += 1
        if self.recorder is not None and self.steps == MEMORY_STEPS:
            self.recorder.remove()
        if self.profiler is not None:
            self.profiler.step()
        if self.sampler is not None and self.logger is not None:
            reading = self.sampler.latest() if (step + 1) % self.log_interval == 0 else None
            if reading:
                self.logger.scalars("gpu", reading, self.steps)

    def stop(self) -> None:
        """Stop the profiler (it writes its trace if still recording), the hooks, the sampler.

        Safe to call more than once.
        """
        profiler, self.profiler = self.profiler, None
        if profiler is not None:
            profiler.stop()
        if self.recorder is not None:
            self.recorder.remove()
        if self.sampler is not None:
            self.sampler.stop()

    def write_reports(self, out: Path) -> None:
        """memory_layers.csv and gpu_report.json (and the report to TensorBoard)."""
        if self.recorder is not None:
            self.recorder.write_csv(out / "memory_layers.csv")
        if self.sampler is not None:
            report = self.sampler.report()
            write_json(out / "gpu_report.json", report)
            if self.logger is not None:
                self.logger.scalars("gpu", report, 0)


@contextmanager
def gpu_monitor(
    model: nn.Module,
    device: torch.device,
    out: Path,
    *,
    enabled: bool = True,
    profile: bool = False,
    layers: bool = True,
    logger: Any = None,
    log_interval: int = 1,
    note: Callable[[str], None] = log.info,
) -> Iterator[GpuMonitor]:
    """Monitor the training steps run inside the ``with`` block; call ``.step(step)`` per step.

    Args:
        enabled: False on ranks other than 0, which monitor nothing.
        profile: also record a few steps with torch.profiler into ``out/tb``, the run's
            TensorBoard log directory, where the PyTorch Profiler plugin looks for traces.
        layers: record per-layer memory (memory_layers.csv). Off for a compiled model: a
            hook on every layer would split its graph and recompile it when they go.
        logger: a :class:`training.logger.MetricLogger` for the ``gpu/*`` scalars, or None.
        note: where to say why a report is skipped (no CUDA, no NVML).
    """
    monitor = GpuMonitor(logger=logger, log_interval=log_interval)
    try:
        if enabled:
            monitor.recorder, monitor.sampler = _start_gpu_reports(model, device, note, layers)
            if profile:
                monitor.profiler = torch_profiler(device, out / "tb")
        yield monitor
        monitor.stop()
        monitor.write_reports(out)
    finally:
        monitor.stop()  # after an error too: no hooks, sampler thread or profiler left running


def _start_gpu_reports(
    model: nn.Module, device: torch.device, note: Callable[[str], None], layers: bool = True
) -> tuple[LayerMemoryRecorder | None, GpuSampler | None]:
    """Layer memory hooks (with ``layers``) and a started NVML sampler, each where the
    machine allows it."""
    # The readers are looked up in this module, so a CPU test swaps in fake readings with
    # monkeypatch.setattr(monitor, "cuda_memory_readers" / "nvml_reader", ...).
    try:
        readers = cuda_memory_readers(device)
    except GpuUnavailable as e:
        note(f"GPU reports skipped ({e}): no memory_layers.csv or gpu_report.json")
        return None, None
    recorder = LayerMemoryRecorder(model, *readers) if layers else None
    if not layers:
        note("memory_layers.csv skipped: --compile (per-layer hooks would split the graph)")
    try:
        info, read = nvml_reader(device)
    except GpuUnavailable as e:
        note(f"gpu_report.json skipped: {e}")
        return recorder, None
    sampler = GpuSampler(read, info, note=note)
    sampler.start()
    return recorder, sampler
