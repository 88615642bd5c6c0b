"""The training step, written once: batch to the device, forward under autocast, loss, update.

``train.py`` (training and evaluation) and ``benchmarks.train_throughput`` run their steps
through :func:`forward_loss` and :func:`train_step`, and time them with :class:`StepTimer`,
so the benchmark measures exactly the step that training runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model import UNet
from training.distributed import Runtime

# What MaskDepthLoss returns, in the order the logs and metrics.json show them.
LOSS_PARTS = ("loss", "mask_bce", "depth_ssim_loss")


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
    """Forward under bf16 autocast when enabled; the loss in float32 (SSIM needs the range)."""
    x, mask, depth = to_device(batch, rt)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=rt.amp):
        mask_logits, depth_pred = model(x)
    mask_logits, depth_pred = mask_logits.float(), depth_pred.float()
    losses = loss_fn(mask_logits, depth_pred, mask, depth)
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
    """Splits the wall time of training steps into data wait and compute, with the host clock.

    :meth:`next_batch` times the wait for a batch; :meth:`step_done` syncs with the device
    so the step's GPU work is counted as compute, not as the next data wait.
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.data_s = 0.0
        self.train_s = 0.0
        self.samples = 0
        self._ready = time.perf_counter()  # when the last batch arrived
        self._window_start = self._ready
        self._window_data_s = 0.0
        self._window_samples = 0

    def next_batch(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        """The next batch from ``batches`` (None when they run out), its wait counted."""
        tic = time.perf_counter()
        batch = next(batches, None)
        self._ready = time.perf_counter()
        self.data_s += self._ready - tic
        self._window_data_s += self._ready - tic
        return batch

    def step_done(self, samples: int) -> None:
        """Close the step that began when the last batch arrived."""
        self.rt.sync()  # note: a CPU-GPU sync point, so GPU work is counted as train time
        self.train_s += time.perf_counter() - self._ready
        self.samples += samples
        self._window_samples += samples

    def window(self) -> tuple[float, float]:
        """``(samples/s, data-wait share)`` since the previous call, for a log line."""
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        rate, wait = self._window_samples / elapsed, self._window_data_s / elapsed
        self._window_start, self._window_data_s, self._window_samples = now, 0.0, 0
        return rate, wait
