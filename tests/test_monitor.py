"""NVML sampling without a GPU (a fake ``pynvml`` module), and cleanup on every exit of train.py.

The fake NVML keeps devices by UUID, as the real one does, and counts init/shutdown calls; a
device can be told to fail its readings, as a lost GPU does. ``torch.cuda``'s device
properties are replaced so that a CUDA index has a UUID on this CPU-only machine.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
import types
from types import SimpleNamespace

import pytest
import torch

import train
from training import monitor

TINY_RUN = ("--batch-size", "4", "--max-batches", "2", "--widths", "4,8,16", "--seed", "0")
GIB = 1 << 30


class NVMLError(Exception):
    pass


class NVMLError_GpuIsLost(NVMLError):
    def __str__(self) -> str:
        return "GPU is lost"


def fake_pynvml(devices: dict[str, str], lost_after: int | None = None) -> types.ModuleType:
    """A ``pynvml`` with ``devices`` (NVML UUID -> name); readings fail after ``lost_after``."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError, nvml.NVML_TEMPERATURE_GPU = NVMLError, 0
    nvml.calls = {"init": 0, "shutdown": 0, "readings": 0}

    def init():
        nvml.calls["init"] += 1

    def shutdown():
        nvml.calls["shutdown"] += 1

    def by_uuid(uuid: str):
        if uuid not in devices:
            raise NVMLError(f"no device {uuid}")
        return uuid

    def by_index(index: int):
        raise AssertionError("NVML's index is not CUDA's: the handle must come from the UUID")

    def utilization(handle):
        nvml.calls["readings"] += 1
        if lost_after is not None and nvml.calls["readings"] > lost_after:
            raise NVMLError_GpuIsLost()
        return SimpleNamespace(gpu=50)

    nvml.nvmlInit, nvml.nvmlShutdown = init, shutdown
    nvml.nvmlDeviceGetHandleByUUID, nvml.nvmlDeviceGetHandleByIndex = by_uuid, by_index
    nvml.nvmlDeviceGetName = lambda handle: devices[handle].encode()  # old pynvml: bytes
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: SimpleNamespace(total=141 * GIB, used=GIB)
    nvml.nvmlDeviceGetUtilizationRates = utilization
    nvml.nvmlDeviceGetTemperature = lambda handle, sensor: 40
    return nvml


@pytest.fixture
def cuda_uuids(monkeypatch):
    """CUDA devices 0 and 1 with bare UUIDs, as torch reports them; no private torch API."""
    uuids = {0: "aaaa-0000", 1: "bbbb-1111"}
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=uuids[i])
    )

    def private(*_):
        raise AssertionError("torch.cuda._get_nvml_device_index is private")

    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", private, raising=False)


def install(monkeypatch, nvml: types.ModuleType) -> types.ModuleType:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml


def test_nvml_reader_finds_the_cuda_device_by_uuid(monkeypatch, cuda_uuids):
    # NVML lists the GPUs in another order than CUDA (CUDA_VISIBLE_DEVICES, PCI order).
    nvml = install(monkeypatch, fake_pynvml({"GPU-bbbb-1111": "GPU B", "GPU-aaaa-0000": "GPU A"}))
    info, read = monitor.nvml_reader(torch.device("cuda", 1))
    assert info == {"device_name": "GPU B", "total_bytes": 141 * GIB}
    assert read() == {"used_bytes": GIB, "util_percent": 50.0, "temperature_c": 40.0}
    read.close()
    read.close()
    assert nvml.calls["init"] == nvml.calls["shutdown"] == 1


def test_nvml_reader_finds_a_mig_slice(monkeypatch, cuda_uuids):
    install(monkeypatch, fake_pynvml({"MIG-aaaa-0000": "GPU A MIG 1g.18gb"}))
    info, read = monitor.nvml_reader(torch.device("cuda", 0))
    assert info["device_name"] == "GPU A MIG 1g.18gb"
    read.close()


def test_nvml_setup_failure_names_the_error_and_shuts_nvml_down(monkeypatch, cuda_uuids):
    nvml = install(monkeypatch, fake_pynvml({"GPU-other": "another machine's GPU"}))
    with pytest.raises(monitor.GpuUnavailable, match="NVML is not usable: NVMLError: no device"):
        monitor.nvml_reader(torch.device("cuda", 0))
    assert nvml.calls["init"] == nvml.calls["shutdown"] == 1


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_sampler_survives_nvml_errors_logs_once_and_reports_them(monkeypatch, cuda_uuids):
    nvml = install(monkeypatch, fake_pynvml({"GPU-aaaa-0000": "GPU A"}, lost_after=2))
    info, read = monitor.nvml_reader(torch.device("cuda", 0))
    notes: list[str] = []
    sampler = monitor.GpuSampler(read, info, interval_s=0.001, note=notes.append)
    sampler.start()
    wait_for(lambda: sampler.errors.get("NVMLError_GpuIsLost: GPU is lost", 0) >= 5)
    assert any(t.name == "gpu-sampler" for t in threading.enumerate())  # still sampling
    sampler.stop()
    assert notes == [
        "GPU reading failed (NVMLError_GpuIsLost: GPU is lost); gpu_report.json counts these errors"
    ]
    report = sampler.report()
    assert report["samples"] == 2 and report["device_name"] == "GPU A"
    assert report["errors"] == {"NVMLError_GpuIsLost: GPU is lost": nvml.calls["readings"] - 2}
    assert nvml.calls["shutdown"] == 1
    sampler.stop()
    assert nvml.calls["shutdown"] == 1


def test_gpu_report_names_nvml_errors(monkeypatch, cuda_uuids, tmp_path):
    """Through gpu_monitor as train.py uses it: the report on disk counts the errors."""
    nvml = install(monkeypatch, fake_pynvml({"GPU-aaaa-0000": "GPU A"}, lost_after=0))
    monkeypatch.setattr(monitor, "cuda_memory_readers", lambda device: (lambda: 1, lambda: 2))
    notes: list[str] = []
    model = torch.nn.Linear(2, 2)
    with monitor.gpu_monitor(model, torch.device("cuda", 0), tmp_path, note=notes.append) as gpu:
        wait_for(lambda: nvml.calls["readings"] >= 2)
        gpu.step(0)
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["samples"] == 0 and report["errors"]["NVMLError_GpuIsLost: GPU is lost"] >= 2
    assert len(notes) == 1 and "GPU is lost" in notes[0]
    assert nvml.calls["shutdown"] == 1


class Watched:
    """Fake CUDA memory and NVML readers that count their calls and their closing."""

    def __init__(self) -> None:
        self.memory_reads = itertools.count()
        self.closed = 0

    def memory_readers(self, device):
        return (lambda: next(self.memory_reads), lambda: 0)

    def nvml_reader(self, device):
        watched = self

        class Reading:
            def __call__(self):
                return {"used_bytes": 1, "util_percent": 1.0, "temperature_c": 1.0}

            def close(self):
                watched.closed += 1

        return {"device_name": "fake"}, Reading()


def sampler_running() -> bool:
    return any(thread.name == "gpu-sampler" for thread in threading.enumerate())


@pytest.mark.parametrize(
    ("exit_by", "profile"),
    [("error", "torch"), ("interrupt", "cprofile"), ("normal", "torch")],
)
def test_every_exit_stops_profiler_sampler_and_memory_hooks(
    exit_by, profile, tiny_shards, tmp_path, monkeypatch
):
    """An error or Ctrl-C in the middle of epoch 1, or a normal end: afterwards no profiler
    records, no sampler thread runs, NVML is closed, and the model has no memory hooks."""
    watched, states = Watched(), []
    monkeypatch.setattr(monitor, "cuda_memory_readers", watched.memory_readers)
    monkeypatch.setattr(monitor, "nvml_reader", watched.nvml_reader)
    real_build_state, real_step = train.build_state, train.train_step

    def build_state(*args, **kwargs):
        states.append(real_build_state(*args, **kwargs))
        return states[-1]

    def step(*args):
        assert sampler_running()  # the monitors are on while the steps run
        if exit_by == "error":
            raise RuntimeError("injected")
        if exit_by == "interrupt":
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train, "build_state", build_state)
    monkeypatch.setattr(train, "train_step", step)
    assert sys.getprofile() is None and not torch.autograd._profiler_enabled()
    args = ["--data", str(tiny_shards), "--epochs", "1", "--out", str(tmp_path / "run")]
    args += [*TINY_RUN, "--profile", profile]
    if exit_by == "normal":
        train.main(args)
        assert json.loads((tmp_path / "run" / "gpu_report.json").read_text())["samples"] >= 1
    else:
        with pytest.raises(RuntimeError if exit_by == "error" else KeyboardInterrupt):
            train.main(args)
    assert not sampler_running() and watched.closed == 1
    assert sys.getprofile() is None  # cProfile is off
    assert not torch.autograd._profiler_enabled()  # torch.profiler is off
    reads = next(watched.memory_reads)
    states[0].model(torch.zeros(1, 2, 160, 160))  # the tiny set's images: 1 channel, 160 px
    assert next(watched.memory_reads) == reads + 1  # no hook read memory during that forward
