"""The training step, written once: batch to the device, forward under autocast, loss, update.

``train.py`` (training and evaluation) and ``benchmarks.train_throughput`` run their steps
through :func:`forward_loss` and :func:`train_step`, and time them with :class:`StepTimer`,
so the benchmark measures exactly the step that training runs.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model import UNet
from pipeline import LoaderError
from training.distributed import Runtime, agree
from training.errors import TrainError

# What MaskDepthLoss returns, in the order the logs and metrics.json show them.
LOSS_PARTS = (
    "loss",
    "mask_bce",
    "mask_dice_loss",
    "depth_ssim_loss",
    "depth_l1",
    "depth_grad",
    "depth_aux",
)
# Failures the user can act on: every rank reports them as the same one line.
USER_ERRORS = (TrainError, LoaderError)


@dataclass
class StepOutput:
    """One forward pass: the losses, the float32 predictions and the targets, on the device."""

    losses: dict[str, torch.Tensor]  # LOSS_PARTS, 0-dim; "loss" is what backward() ran on
    mask_logits: torch.Tensor  # (B, 1, H, W)
    depth_pred: torch.Tensor  # (B, 1, h, w)
    mask: torch.Tensor  # (B, 1, H, W) in {0, 1}
    depth: torch.Tensor  # (B, 1, h, w) in [0, 1]

    @property
    def samples(self) -> int:
        """The batch size (known from shapes, so reading it does not sync)."""
        return self.mask.shape[0]


def to_device(
    batch: dict[str, Any], rt: Runtime
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, mask, depth)`` on the device; x is bg and fg_bg concatenated, ``(B, 2C, H, W)``."""
    x = UNet.input_from(batch["bg"], batch["fg_bg"])
    x = x.to(rt.device, non_blocking=True).contiguous(memory_format=rt.memory_format)
    mask = batch["mask"].to(rt.device, non_blocking=True).float()
    depth = batch["depth"].to(rt.device, non_blocking=True).float()
    return x, mask, depth


def forward_loss(
    model: nn.Module, loss_fn: nn.Module, batch: dict[str, Any], rt: Runtime
) -> StepOutput:
    """Forward under bf16 autocast when enabled; the loss in float32 (SSIM needs the range).

    A model in training mode with auxiliary depth heads also returns their maps for the loss.
    """
    x, mask, depth = to_device(batch, rt)
    aux = model.training and getattr(model, "module", model).cfg.aux_depth  # DDP or not
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=rt.amp):
        out = model(x, aux=True) if aux else model(x)
    mask_logits, depth_pred = out[0].float(), out[1].float()
    losses = loss_fn(mask_logits, depth_pred, mask, depth, out[2] if aux else ())
    return StepOutput(losses, mask_logits, depth_pred, mask, depth)


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    rt: Runtime,
) -> StepOutput:
    """One optimisation step on ``batch``: forward, loss, backward, optimizer step."""
    out = forward_loss(model, loss_fn, batch, rt)
    optimizer.zero_grad(set_to_none=True)
    out.losses["loss"].backward()
    optimizer.step()
    return out


class StepTimer:
    """Splits the wall time of training steps into data wait and compute, without host syncs.

    On the CPU the host clock tells both: :meth:`next_batch` times the wait for a batch and
    :meth:`step_done` the step after it. On CUDA the host only queues work, so its clock would
    count GPU work as data wait. There each step is bracketed by two CUDA events, read only
    when a figure is asked for (a log step or the epoch's end): compute is the time between a
    step's two events on the GPU, and data wait is the GPU's idle gap before the next step,
    which is the time the host spent waiting for that batch once the queue ran dry.
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.cuda = rt.device.type == "cuda"
        self.samples = 0
        self._data_s = 0.0
        self._train_s = 0.0
        self._ready = time.perf_counter()  # when the last batch arrived
        self._window_start = self._ready
        self._window_data_s = 0.0
        self._window_samples = 0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start: torch.cuda.Event | None = None  # the current step's start event
        self._last_end: torch.cuda.Event | None = None  # the last read step's end event

    def next_batch(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        """The next batch from ``batches`` (None when they run out), its wait counted."""
        tic = time.perf_counter()
        batch = next(batches, None)
        self._ready = time.perf_counter()
        if not self.cuda or (self._last_end is None and not self._pending):
            # On CUDA only the first wait is host time: no GPU work came before it.
            self._add_data(self._ready - tic)
        if self.cuda and batch is not None:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        return batch

    def step_done(self, samples: int) -> None:
        """Close the step that began when the last batch arrived."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()  # read later: no sync here
            self._pending.append((self._start, end))
        else:
            self._train_s += time.perf_counter() - self._ready
        self.samples += samples
        self._window_samples += samples

    @property
    def data_s(self) -> float:
        """Seconds spent waiting for batches (so far)."""
        self._read_events()
        return self._data_s

    @property
    def train_s(self) -> float:
        """Seconds spent computing steps (so far)."""
        self._read_events()
        return self._train_s

    def window(self) -> tuple[float, float]:
        """``(samples/s, data-wait share)`` since the previous call, for a log line."""
        self._read_events()
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        rate, wait = self._window_samples / elapsed, min(self._window_data_s / elapsed, 1.0)
        self._window_start, self._window_data_s, self._window_samples = now, 0.0, 0
        return rate, wait

    def _add_data(self, seconds: float) -> None:
        self._data_s += seconds
        self._window_data_s += seconds

    def _read_events(self) -> None:
        """Turn the queued steps' events into seconds; waits for the last one to finish."""
        if not self._pending:
            return
        # note: a CPU-GPU sync point, reached only at log steps and at the epoch's end
        self._pending[-1][1].synchronize()
        for start, end in self._pending:
            if self._last_end is not None:
                self._add_data(self._last_end.elapsed_time(start) / 1000)
            self._train_s += start.elapsed_time(end) / 1000
            self._last_end = end
        self._pending.clear()


class StopCheck:
    """Ends an epoch's steps on every rank together: when one rank fails, or when a signal
    asked a rank to stop.

    Every rank takes the same number of steps (``pipeline.order``), so before each step the
    ranks agree (:func:`training.distributed.agree`) whether any has failed (a batch it could
    not read, a loss it found not finite at its last log step) or was asked to stop. A failure
    makes all raise the same error before the next gradient all-reduce, instead of the others
    waiting in it for a rank that has left; a stop ends the epoch on all at the same step
    (``stopped``), so that the checkpoint saved then holds the same position for every rank.
    In a single process a failure is raised at once.
    """

    def __init__(self, rt: Runtime, steps: int) -> None:
        self.rt, self.steps = rt, steps
        self.error: BaseException | None = None
        self.stopped = False

    def fail(self, error: BaseException) -> None:
        """Keep ``error`` for the next agreement (a single process raises it now)."""
        if not self.rt.distributed:
            raise error
        self.error = self.error or error

    def next_batch(
        self, timer: StepTimer, batches: Iterator[dict[str, Any]], step: int, stop: bool = False
    ) -> dict[str, Any] | None:
        """Step ``step``'s batch, or None when the ranks agreed to stop (``stop``: this rank
        was asked to); raises on every rank when any rank has failed."""
        batch = None
        if self.error is None and not stop:
            try:
                batch = timer.next_batch(batches)
            except Exception as e:  # a loader error on this rank only: tell the others first
                self.fail(e)
        if agree(self.error, self.rt, stop, USER_ERRORS):
            self.stopped = True
            return None
        return batch

    def finish(self) -> None:
        """Every rank, at the epoch's end: stop all if any failed in its last step."""
        agree(self.error, self.rt, user_errors=USER_ERRORS)


@contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """While inside, SIGINT and SIGTERM ask the loop to stop at its next step (the callable
    says whether one came) instead of killing it mid-step; a second SIGINT stops at once."""
    requested: list[int] = []

    def handler(signum, frame):
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False  # signals reach the main thread only
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
