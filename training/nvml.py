"""NVML samples of a CUDA device (memory used, utilisation, temperature), taken on a thread
and aggregated into gpu_report.json.

:class:`GpuSampler` takes any reading function, so it runs on CPU in tests with fake readings;
:func:`nvml_reader` gives the real one. ``pynvml`` is imported only inside :func:`nvml_reader`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from training.gpu_memory import GpuUnavailable

log = logging.getLogger(__name__)


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
