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

from model import UNet, UNetConfig
from pipeline import LoaderError
from training.distributed import Runtime, agree, agree_and_sum
from training.errors import TrainError

# What MaskDepthLoss returns for the logs, in the order they and metrics.json show them.
# "loss" adds up the same terms in both splits; the auxiliary depth term is training's only.
TEST_LOSS_PARTS = (
    "loss",
    "mask_bce",
    "mask_dice_loss",
    "depth_ssim_loss",
    "depth_l1",
    "depth_grad",
)
LOSS_PARTS = (*TEST_LOSS_PARTS, "depth_aux")
# Failures the user can act on: every rank reports them as the same one line.
USER_ERRORS = (TrainError, LoaderError)


@dataclass
class StepOutput:
    """One forward pass: the losses, the float32 predictions and the targets, on the device."""

    losses: dict[str, torch.Tensor]  # 0-dim: LOSS_PARTS and "objective", what backward() ran on
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
    out.losses["objective"].backward()
    optimizer.step()
    return out


def read_losses(losses: dict[str, torch.Tensor], parts: tuple[str, ...] = LOSS_PARTS) -> dict:
    """``parts`` of a step's ``losses`` as floats, in one device-to-host copy."""
    # note: a CPU-GPU sync point, so it happens only at log steps
    values = torch.stack([losses[k].detach() for k in parts]).tolist()
    return dict(zip(parts, values))


def zero_batch(cfg: UNetConfig, batch_size: int, rt: Runtime) -> dict[str, torch.Tensor]:
    """A batch of zeros shaped as the loader's for the model ``cfg``: what a rank that could
    not read its batch trains on until the ranks next agree (:class:`StopCheck`)."""
    image = (batch_size, cfg.in_channels, cfg.mask_size, cfg.mask_size)
    zeros = {"bg": image, "fg_bg": image, "mask": (batch_size, 1, cfg.mask_size, cfg.mask_size)}
    zeros["depth"] = (batch_size, 1, cfg.depth_size, cfg.depth_size)
    return {k: torch.zeros(shape, device=rt.device) for k, shape in zeros.items()}


class StepTimer:
    """Splits the wall time of training steps into data wait and compute, without host syncs.

    On the CPU the host clock tells both: :meth:`next_batch` times the wait for a batch and
    :meth:`step_done` the step after it. On CUDA the host only queues work, so its clock would
    count GPU work as data wait. There each step is bracketed by two CUDA events, read only
    when a figure is asked for (a log step or the epoch's end): compute is the time between a
    step's two events on the GPU, and data wait is the GPU's idle gap before the next step,
    which is the time the host spent waiting for that batch once the queue ran dry.
    """

    def __init__(self, rt: Runtime, clock: Callable[[], float] = time.perf_counter) -> None:
        self.rt, self.clock = rt, clock  # the host clock; tests inject their own
        self.cuda = rt.device.type == "cuda"
        self.samples = 0
        self._data_s = 0.0
        self._train_s = 0.0
        self._ready = clock()  # when the last batch arrived
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start: torch.cuda.Event | None = None  # the current step's start event
        self._last_end: torch.cuda.Event | None = None  # the last read step's end event

    def next_batch(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        """The next batch from ``batches`` (None when they run out), its wait counted."""
        tic = self.clock()
        batch = next(batches, None)
        self._ready = self.clock()
        if not self.cuda or (self._last_end is None and not self._pending):
            # On CUDA only the first wait is host time: no GPU work came before it.
            self._data_s += self._ready - tic
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
            self._train_s += self.clock() - self._ready
        self.samples += samples

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

    def _read_events(self) -> None:
        """Turn the queued steps' events into seconds; waits for the last one to finish."""
        if not self._pending:
            return
        # note: a CPU-GPU sync point, reached only at log steps and at the epoch's end
        self._pending[-1][1].synchronize()
        for start, end in self._pending:
            if self._last_end is not None:
                self._data_s += self._last_end.elapsed_time(start) / 1000
            self._train_s += start.elapsed_time(end) / 1000
            self._last_end = end
        self._pending.clear()


class StopCheck:
    """Ends an epoch's steps on every rank together: when one rank fails, or when a signal
    asked a rank to stop.

    Every rank takes the same number of steps (``pipeline.order``), and the ranks agree
    (:func:`training.distributed.agree`, one host collective) only where the loop asks them
    to: at log steps, checkpoint steps and the epoch's end, so the step itself keeps DDP's
    gradient all-reduce as its one collective. A failure (a batch this rank could not read,
    a loss it found not finite at a log step) is kept until then, and all ranks raise the
    same error there; a rank whose batch failed trains on zeros (``filler``) meanwhile, so
    that the others are not left waiting for it in the gradient all-reduce. Nothing is saved
    before that agreement: a checkpoint step agrees first. A stop ends the epoch on all at
    the same step (``stopped``), so that the checkpoint saved then holds the same position
    for every rank. In a single process a failure is raised at once and agreeing is free,
    so a stop is seen at every step.
    """

    def __init__(self, rt: Runtime, filler: Callable[[], dict[str, Any]]) -> None:
        self.rt, self.filler = rt, filler
        self.error: BaseException | None = None
        self.stopped = False

    def fail(self, error: BaseException) -> None:
        """Keep ``error`` for the next agreement (a single process raises it now)."""
        if not self.rt.distributed:
            raise error
        self.error = self.error or error

    def next_batch(self, timer: StepTimer, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """The next batch, or after a failure on this rank the filler batch."""
        if self.error is None:
            try:
                batch = timer.next_batch(batches)
            except Exception as e:  # a loader error on this rank only: told at the next agreement
                self.fail(e)
            else:
                if batch is not None:
                    return batch
                self.fail(TrainError("the training loader ended before the epoch's last step"))
        return self.filler()

    def due(self, *points: bool) -> bool:
        """Whether to agree now: at any of ``points``, and at every step in one process."""
        return any(points) or not self.rt.distributed

    def agree(self, stop: bool) -> bool:
        """Every rank, at an agreement point: raise on all if any failed; True (and
        ``stopped``) when any rank was asked to ``stop``."""
        self.stopped = agree(self.error, self.rt, stop, USER_ERRORS)
        return self.stopped

    def finish(self, totals: torch.Tensor) -> torch.Tensor:
        """Every rank, at the epoch's end: stop all if any failed since the last agreement;
        ``totals`` summed over the ranks, in the same collective."""
        return agree_and_sum(totals, self.error, self.rt, user_errors=USER_ERRORS)[1]


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
