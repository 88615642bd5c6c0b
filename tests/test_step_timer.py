"""StepTimer: the data/compute split, from the host clock on the CPU and CUDA events on a GPU."""

from __future__ import annotations

import time

import pytest
import torch

from training import step as step_module
from training.distributed import Runtime
from training.step import StepTimer

WAIT_S, WORK_S, STEPS = 0.03, 0.01, 6


def slow_batches(n: int):
    for i in range(n):
        time.sleep(WAIT_S)  # the loader is the bottleneck
        yield {"i": i}


def run_steps(timer: StepTimer, n: int) -> None:
    batches = slow_batches(n)
    while (batch := timer.next_batch(batches)) is not None:
        time.sleep(WORK_S)
        timer.step_done(samples=4)
        assert batch["i"] >= 0


def test_cpu_split_follows_the_host_clock():
    timer = StepTimer(Runtime(device=torch.device("cpu")))
    run_steps(timer, STEPS)
    assert timer.samples == 4 * STEPS
    assert timer.data_s == pytest.approx(STEPS * WAIT_S, rel=0.5)
    assert timer.train_s == pytest.approx(STEPS * WORK_S, rel=0.5)
    assert timer.data_s > timer.train_s


class HostEvent:
    """A stand-in for torch.cuda.Event that records the host clock, and counts syncs."""

    syncs = 0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.t = None

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        HostEvent.syncs += 1

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.t - self.t) * 1000.0  # milliseconds, as CUDA events report


def test_cuda_split_comes_from_events_read_only_when_asked(monkeypatch):
    monkeypatch.setattr(step_module.torch.cuda, "Event", HostEvent)
    HostEvent.syncs = 0
    timer = StepTimer(Runtime(device=torch.device("cuda")))
    run_steps(timer, STEPS)
    assert HostEvent.syncs == 0  # no step waited for the device
    assert timer.data_s == pytest.approx(STEPS * WAIT_S, rel=0.5)  # first wait + idle gaps
    assert timer.train_s == pytest.approx(STEPS * WORK_S, rel=0.5)
    assert HostEvent.syncs == 1  # one sync to read the figures, then nothing pending
    rate, wait = timer.window()
    assert HostEvent.syncs == 1 and 0 < wait <= 1 and rate > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_events_count_gpu_work_as_compute():
    rt = Runtime(device=torch.device("cuda"))
    timer = StepTimer(rt)
    a = torch.randn(4096, 4096, device="cuda")
    batches = iter([{"i": i} for i in range(5)])
    while timer.next_batch(batches) is not None:
        for _ in range(10):
            a = (a @ a).clamp_(-1, 1)  # queued GPU work, far longer than the host's part
        timer.step_done(samples=1)
    assert timer.train_s > 0.001 and timer.train_s > timer.data_s
