"""What a run tells its user while it trains: step lines, epoch lines and TensorBoard.

:class:`LossTotals` sums the loss parts on the device, to be read once per epoch;
:class:`MetricLogger` prints rank 0's log lines and writes its TensorBoard scalars, images
and histograms. It is ``train.py``'s console, so it writes with ``tqdm.write`` (a line
that does not break the progress bar); on other ranks every method does nothing.

Every TensorBoard value is logged against the optimizer step (per-epoch values at the
epoch's last step), which continues across ``--resume``; a resumed run drops what a killed
run logged after its checkpoint, so each step appears once.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from training import figures
from training.rundir import timing_table, training_rates
from training.step import LOSS_PARTS, StepTimer

# Per-epoch values that are bookkeeping rather than curves.
NOT_SCALARS = ("samples", "data_s", "train_s")


class LossTotals:
    """Sample-weighted sums of loss ``parts`` over batches, kept on the device."""

    def __init__(self, device: torch.device, parts: tuple[str, ...] = LOSS_PARTS) -> None:
        self.parts = parts
        self.sums = torch.zeros(len(parts) + 1, device=device)  # loss parts..., samples
        self._one = torch.ones((), device=device)  # made once: no per-batch host-to-device copy

    def add(self, losses: dict[str, torch.Tensor], samples: int) -> None:
        """Add one batch's mean losses, weighted by its ``samples``."""
        self.sums += torch.stack([losses[k].detach() for k in self.parts] + [self._one]) * samples

    def means(self, sums: torch.Tensor | None = None) -> tuple[dict[str, float], int]:
        """``(mean of each loss part, samples)`` of ``sums``: :attr:`sums` summed over the
        ranks by the caller, or this rank's own when None."""
        values = (self.sums if sums is None else sums).tolist()  # one device sync per epoch
        samples = round(values[-1])
        return {k: s / max(samples, 1) for k, s in zip(self.parts, values)}, samples


class RateWindow:
    """Training samples/s and data-wait share since the last read, for a log line.

    On the same clock as timings.csv (:func:`training.rundir.training_rates`: steps plus data
    wait), so over an epoch the log lines add up to its row; for all ranks, as this rank's
    rate times ``world_size`` (DDP steps in lockstep).
    """

    def __init__(self, timer: StepTimer, world_size: int = 1) -> None:
        self.timer, self.world_size = timer, world_size
        self._seen = (0, 0.0, 0.0)  # samples, train_s, data_s at the last read

    def read(self) -> tuple[float, float]:
        """``(samples/s, data-wait share)`` since the previous call."""
        now = (self.timer.samples, self.timer.train_s, self.timer.data_s)
        samples, train_s, data_s = (a - b for a, b in zip(now, self._seen))
        self._seen = now
        rates = training_rates(samples * self.world_size, train_s, data_s)
        return rates["samples_per_s"], rates["data_wait_share"]


class MetricLogger:
    """Rank 0's log lines and TensorBoard events in ``tb_dir``; silent where ``tb_dir`` is None.

    ``steps_per_epoch`` places every value on the optimizer-step axis; ``start_epoch`` (the
    epochs a resumed run restored) drops events a killed run logged after them. The event
    file is made on the first write, so a run that logs nothing (``--test-only``, a failed
    start) leaves none.
    """

    def __init__(self, tb_dir: Path | None, steps_per_epoch: int = 1, start_epoch: int = 0) -> None:
        self.enabled = tb_dir is not None
        self.tb_dir, self.steps_per_epoch = tb_dir, steps_per_epoch
        self.first_step = start_epoch * steps_per_epoch  # steps the checkpoint already holds
        self._writer = None

    @property
    def writer(self) -> Any:
        """The SummaryWriter, made on first use."""
        if self._writer is None and self.tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # defer: a slow import

            # TensorBoard drops every event at or after purge_step from the files before
            # this one: what a killed run logged after the checkpoint this run resumed from.
            self._writer = SummaryWriter(str(self.tb_dir), purge_step=self.first_step + 1)
        return self._writer

    def progress(self, total: int, desc: str, unit: str) -> tqdm:
        """A progress bar on rank 0 (disabled elsewhere) that leaves no line behind."""
        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            disable=not self.enabled,
            leave=False,
            dynamic_ncols=True,
            # tqdm's own rate (wall clock, smoothed) is left out: the postfix shows the step
            # log's samples/s, so the two never disagree.
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
        )

    def step(
        self,
        epoch: int,
        step: int,
        total: int,
        values: dict[str, float],
        lr: float,
        window: tuple[float, float],
        bar: tqdm,
    ) -> None:
        """One log line, the bar's postfix and the ``train_step/*`` scalars; ``window`` is
        :meth:`RateWindow.read`'s (samples/s, data wait)."""
        if not self.enabled:
            return
        rate, wait = window
        bar.set_postfix(
            {"loss": f"{values['loss']:.4f}", "samples/s": f"{rate:.1f}"}, refresh=False
        )
        parts = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        tqdm.write(
            f"epoch {epoch + 1} step {step + 1}/{total} {parts} lr {lr:.3g} "
            f"samples/s {rate:.1f} data-wait {wait:.0%}"
        )
        global_step = epoch * self.steps_per_epoch + step + 1
        for k, v in values.items():
            self.writer.add_scalar(f"train_step/{k}", v, global_step)
        self.writer.add_scalar("train_step/lr", lr, global_step)
        self.writer.add_scalar("train_step/samples_per_s", rate, global_step)
        self.writer.add_scalar("train_step/data_wait_share", wait, global_step)

    def epoch(
        self,
        record: dict[str, Any],
        is_best: bool,
        grid: Image.Image | None,
        weights: nn.Module | None = None,
    ) -> None:
        """``train/*`` and ``test/*`` scalars, the ``test/samples`` grid, ``weights/*``
        histograms of ``weights`` when given (``--histograms``), and the epoch line."""
        if not self.enabled:
            return
        epoch = record["epoch"]
        global_step = epoch * self.steps_per_epoch  # the epoch's last optimizer step
        for split in ("train", "test"):
            for k, v in record[split].items():
                if isinstance(v, (int, float)) and k not in NOT_SCALARS:
                    self.writer.add_scalar(f"{split}/{k}", v, global_step)
        if grid is not None:
            self.writer.add_image("test/samples", figures.pil_to_tensor(grid), global_step)
        for name, param in weights.named_parameters() if weights is not None else ():
            weight = param.detach().float().cpu()
            self.writer.add_histogram(f"weights/{name}", weight, global_step)
        self.writer.flush()
        test = record["test"]
        tqdm.write(
            f"epoch {epoch}: train loss {record['train']['loss']:.4f}, test loss "
            f"{test['loss']:.4f} IoU {test['iou']:.4f} Dice {test['dice']:.4f} depth RMSE "
            f"{test['depth_rmse']:.4f}{' (best)' if is_best else ''}"
        )

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        """``prefix/key`` scalars for the numeric entries of ``values`` (e.g. ``gpu/*``);
        ``step`` counts the steps of this process, which start after the resumed ones."""
        if not self.enabled:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f"{prefix}/{k}", v, self.first_step + step)

    def graph(self, model: nn.Module, unet_cfg: Any, device: torch.device) -> None:
        """The model graph, traced on a zero batch; tracing can fail on some builds, which is
        not fatal."""
        if not self.enabled:
            return
        size = unet_cfg.mask_size
        example = torch.zeros(1, 2 * unet_cfg.in_channels, size, size, device=device)
        try:
            with warnings.catch_warnings():  # the tracer warns about the model's shape checks
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                self.writer.add_graph(model, example)
        except Exception as e:  # tracing raises many error types; a missing graph is cosmetic
            print(f"TensorBoard graph skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    def summary(self, test: dict[str, Any], history: list[dict[str, Any]], out: Path) -> None:
        """The timing table and the final test metrics, and where the results are."""
        if not self.enabled:
            return
        if history:
            print(timing_table(history))
        print(
            f"test IoU {test['iou']:.4f}  Dice {test['dice']:.4f}  depth RMSE "
            f"{test['depth_rmse']:.4f}  ({test['samples']} test samples)"
        )
        print(f"results figure: {out / 'results.png'}")
        print(f"metrics:        {out / 'metrics.json'}")
        if self._writer is not None or any(self.tb_dir.glob("events.out.tfevents.*")):
            print(f"TensorBoard:    tensorboard --logdir {self.tb_dir}")
        for trace in sorted(self.tb_dir.glob("*.pt.trace.json*")):
            print(
                f"torch.profiler: {trace} (TensorBoard's PyTorch Profiler tab with "
                "`pip install torch-tb-profiler`, or open it in https://ui.perfetto.dev)"
            )

    def close(self) -> None:
        """Flush and close the event file, if one was made."""
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
