"""What a run measures about itself: per-layer CUDA memory, NVML samples, profilers.

:func:`gpu_monitor` is the one context manager a training loop needs: it starts the
per-layer memory recorder and the NVML sampler (CUDA, rank 0) and the torch profiler
(``--profile torch``), steps them with the loop, writes memory_layers.csv, gpu_report.json
and the trace on success, and always stops them, on errors too.

The readings come in as plain functions, so the bookkeeping runs on CPU in tests with
deterministic fake readings; :func:`cuda_memory_readers` and :func:`nvml_reader` give the
real ones. ``pynvml`` is imported only inside :func:`nvml_reader`.
"""

from __future__ import annotations

import cProfile
import csv
import io
import logging
import pstats
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharding.atomic import atomic_path, atomic_write, write_json

log = logging.getLogger(__name__)

# A few steps show the per-layer memory pattern; recording more only costs time.
MEMORY_STEPS = 3

MEMORY_COLUMNS = (
    "layer_idx",
    "call_idx",
    "layer_type",
    "exp",
    "hook_type",
    "mem_all",
    "mem_cached",
)


class GpuUnavailable(Exception):
    """No CUDA device or no NVML: the GPU reports are skipped, the run goes on."""


class LayerMemoryRecorder:
    """Record allocated and reserved memory before and after every module's forward.

    One row per hook call with :data:`MEMORY_COLUMNS`; ``call_idx`` counts hook calls in
    order, ``layer_idx`` is the module's index in ``model.modules()``.
    """

    def __init__(
        self,
        model: nn.Module,
        read_allocated: Callable[[], int],
        read_reserved: Callable[[], int],
        exp: str = "train",
    ) -> None:
        self.rows: list[dict[str, Any]] = []
        self._read_allocated = read_allocated
        self._read_reserved = read_reserved
        self._handles = []
        for layer_idx, module in enumerate(model.modules()):
            self._handles.append(
                module.register_forward_pre_hook(self._hook(layer_idx, module, exp, "pre"))
            )
            self._handles.append(
                module.register_forward_hook(self._hook(layer_idx, module, exp, "fwd"))
            )

    def _hook(self, layer_idx: int, module: nn.Module, exp: str, hook_type: str) -> Callable:
        layer_type = type(module).__name__

        def record(*_: Any) -> None:
            self.rows.append(
                {
                    "layer_idx": layer_idx,
                    "call_idx": len(self.rows),
                    "layer_type": layer_type,
                    "exp": exp,
                    "hook_type": hook_type,
                    "mem_all": self._read_allocated(),
                    "mem_cached": self._read_reserved(),
                }
            )

        return record

    def remove(self) -> None:
        """Detach every hook; the rows stay."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def write_csv(self, path: str | Path) -> None:
        """Write the rows to ``path`` with a header line."""
        with atomic_write(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MEMORY_COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)


class GpuSampler:
    """Call ``read_fn`` periodically (or by hand with :meth:`sample`) and aggregate.

    ``read_fn()`` returns ``{"used_bytes": int, "util_percent": float, "temperature_c": float}``;
    ``info`` holds the static facts (device name, total memory) copied into the report. A
    reading that fails on the thread is counted by its message in the report's ``errors``,
    and each new message goes to ``note`` once; the thread goes on sampling. :meth:`stop`
    also calls ``read_fn.close()`` where it has one (NVML's shutdown).
    """

    def __init__(
        self,
        read_fn: Callable[[], dict[str, float]],
        info: dict[str, Any] | None = None,
        interval_s: float = 0.5,
        note: Callable[[str], None] = log.warning,
    ) -> None:
        self.read_fn = read_fn
        self.info = dict(info or {})
        self.interval_s = interval_s
        self.note = note
        self.samples: list[dict[str, float]] = []
        self.errors: dict[str, int] = {}  # message -> how many readings failed with it
        self._close = getattr(read_fn, "close", None)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> dict[str, float]:
        """Take one reading now and keep it."""
        reading = self.read_fn()
        with self._lock:
            self.samples.append(reading)
        return reading

    def latest(self) -> dict[str, float] | None:
        """The most recent reading, or None before the first."""
        with self._lock:
            return self.samples[-1] if self.samples else None

    def start(self) -> None:
        """Sample every ``interval_s`` on a daemon thread until :meth:`stop`."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as e:  # NVML raises its own error classes (NVMLError_*)
                self._failed(e)
            self._stop.wait(self.interval_s)

    def _failed(self, error: Exception) -> None:
        lines = str(error).strip().splitlines()
        message = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        with self._lock:
            seen = self.errors.get(message, 0)
            self.errors[message] = seen + 1
        if not seen:
            self.note(f"GPU reading failed ({message}); gpu_report.json counts these errors")

    def stop(self) -> None:
        """Stop the sampling thread, if running, and close the reader (safe to repeat)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        close, self._close = self._close, None
        if close is not None:
            try:
                close()
            except Exception as e:  # on an error path, the run's own error matters more
                self.note(f"GPU reader did not close: {type(e).__name__}: {e}")

    def report(self) -> dict[str, Any]:
        """Static info plus used/peak memory, mean/peak utilisation and temperature."""
        with self._lock:
            samples = list(self.samples)
            errors = dict(self.errors)
        report: dict[str, Any] = {**self.info, "samples": len(samples)}
        if errors:
            report["errors"] = errors
        if not samples:
            return report
        used = [s["used_bytes"] for s in samples]
        util = [s["util_percent"] for s in samples]
        temp = [s["temperature_c"] for s in samples]
        report.update(
            used_bytes=used[-1],
            peak_used_bytes=max(used),
            mean_util_percent=sum(util) / len(util),
            peak_util_percent=max(util),
            mean_temperature_c=sum(temp) / len(temp),
            peak_temperature_c=max(temp),
        )
        return report


def cuda_memory_readers(device: torch.device) -> tuple[Callable[[], int], Callable[[], int]]:
    """``(read_allocated, read_reserved)`` for a CUDA ``device``."""
    if device.type != "cuda":
        raise GpuUnavailable(f"device {device} is not a CUDA device")
    return (
        lambda: torch.cuda.memory_allocated(device),
        lambda: torch.cuda.memory_reserved(device),
    )


class NvmlReading:
    """One NVML reading of a device per call; :meth:`close` shuts NVML down (once)."""

    def __init__(self, pynvml: Any, handle: Any) -> None:
        self.pynvml, self.handle = pynvml, handle

    def __call__(self) -> dict[str, float]:
        nvml, handle = self.pynvml, self.handle
        return {
            "used_bytes": nvml.nvmlDeviceGetMemoryInfo(handle).used,
            "util_percent": float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            "temperature_c": float(
                nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
            ),
        }

    def close(self) -> None:
        """Release NVML; safe to call more than once."""
        nvml, self.pynvml = self.pynvml, None
        if nvml is not None:
            nvml.nvmlShutdown()


def nvml_handle(pynvml: Any, device: torch.device) -> Any:
    """NVML's handle for the CUDA ``device``, found by the UUID CUDA reports for it.

    NVML numbers GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES, so CUDA's index is not
    NVML's; the UUID is the same in both. CUDA gives it bare, NVML with a ``GPU-`` prefix
    (``MIG-`` for a MIG slice).
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    names = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
    for name in names[:-1]:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(name)
        except pynvml.NVMLError:
            continue  # not a whole GPU: try it as a MIG slice
    return pynvml.nvmlDeviceGetHandleByUUID(names[-1])


def nvml_reader(device: torch.device) -> tuple[dict[str, Any], Callable[[], dict[str, float]]]:
    """``(info, read_fn)`` for :class:`GpuSampler` from NVML for a CUDA ``device``;
    ``read_fn.close()`` shuts NVML down (:meth:`GpuSampler.stop` calls it)."""
    if device.type != "cuda":
        raise GpuUnavailable(f"device {device} is not a CUDA device")
    started = None
    try:
        import pynvml  # defer: only CUDA runs need NVML

        pynvml.nvmlInit()
        started = pynvml
        handle = nvml_handle(pynvml, device)
        name = pynvml.nvmlDeviceGetName(handle)
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
    except Exception as e:  # NVML raises its own error classes; any of them means "no NVML"
        if started is not None:
            started.nvmlShutdown()
        raise GpuUnavailable(f"NVML is not usable: {type(e).__name__}: {e}") from e
    info = {"device_name": name if isinstance(name, str) else name.decode(), "total_bytes": total}
    return info, NvmlReading(pynvml, handle)


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
    logger: Any = None,
    log_interval: int = 1,
    note: Callable[[str], None] = log.info,
) -> Iterator[GpuMonitor]:
    """Monitor the training steps run inside the ``with`` block; call ``.step(step)`` per step.

    Args:
        enabled: False on ranks other than 0, which monitor nothing.
        profile: also record a few steps with torch.profiler into ``out/profile``.
        logger: a :class:`training.logger.MetricLogger` for the ``gpu/*`` scalars, or None.
        note: where to say why a report is skipped (no CUDA, no NVML).
    """
    monitor = GpuMonitor(logger=logger, log_interval=log_interval)
    try:
        if enabled:
            monitor.recorder, monitor.sampler = _start_gpu_reports(model, device, note)
            if profile:
                monitor.profiler = torch_profiler(device, out / "profile")
        yield monitor
        monitor.stop()
        monitor.write_reports(out)
    finally:
        monitor.stop()  # after an error too: no hooks, sampler thread or profiler left running


def _start_gpu_reports(
    model: nn.Module, device: torch.device, note: Callable[[str], None]
) -> tuple[LayerMemoryRecorder | None, GpuSampler | None]:
    """Layer memory hooks and a started NVML sampler, each where the machine allows it."""
    try:
        readers = cuda_memory_readers(device)
    except GpuUnavailable as e:
        note(f"GPU reports skipped ({e}): no memory_layers.csv or gpu_report.json")
        return None, None
    recorder = LayerMemoryRecorder(model, *readers)
    try:
        info, read = nvml_reader(device)
    except GpuUnavailable as e:
        note(f"gpu_report.json skipped: {e}")
        return recorder, None
    sampler = GpuSampler(read, info, note=note)
    sampler.start()
    return recorder, sampler


def torch_profiler(device: torch.device, trace_dir: Path) -> Any:
    """A started torch.profiler that records a few steps into ``trace_dir`` for TensorBoard."""
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
