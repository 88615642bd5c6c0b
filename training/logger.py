"""What a run tells its user while it trains: step lines, epoch lines and TensorBoard.

:class:`LossTotals` sums the loss parts on the device and reads them once per epoch;
:class:`MetricLogger` prints rank 0's log lines and writes its TensorBoard scalars, images
and histograms. It is ``train.py``'s console, so it writes with ``tqdm.write`` (a line
that does not break the progress bar); on other ranks every method does nothing.
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
from training.distributed import Runtime, all_reduce_sum
from training.rundir import timing_table
from training.step import LOSS_PARTS

# Per-epoch values that are bookkeeping rather than curves.
NOT_SCALARS = ("samples", "data_s", "train_s")


class LossTotals:
    """Sample-weighted sums of :data:`LOSS_PARTS` over batches, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(LOSS_PARTS) + 1, device=device)  # loss parts..., samples
        self._one = torch.ones((), device=device)  # made once: no per-batch host-to-device copy

    def add(self, losses: dict[str, torch.Tensor], samples: int) -> None:
        """Add one batch's mean losses, weighted by its ``samples``."""
        self.sums += torch.stack([losses[k].detach() for k in LOSS_PARTS] + [self._one]) * samples

    def means(self, rt: Runtime) -> tuple[dict[str, float], int]:
        """``(mean of each loss part, samples)`` over all ranks; every rank must call it."""
        sums = all_reduce_sum(self.sums, rt).tolist()  # one device sync per epoch
        samples = int(sums[-1])
        return {k: s / max(samples, 1) for k, s in zip(LOSS_PARTS, sums)}, samples


class MetricLogger:
    """Rank 0's log lines and TensorBoard events in ``tb_dir``; silent where ``tb_dir`` is None."""

    def __init__(self, tb_dir: Path | None) -> None:
        self.enabled = tb_dir is not None
        self.writer = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # defer: a slow import

            self.writer = SummaryWriter(str(tb_dir))

    def progress(self, total: int, desc: str, unit: str) -> tqdm:
        """A progress bar on rank 0 (disabled elsewhere) that leaves no line behind."""
        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            disable=not self.enabled,
            leave=False,
            dynamic_ncols=True,
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
        """One log line and the ``train_step/*`` scalars; ``window`` is (samples/s, data wait)."""
        if not self.enabled:
            return
        rate, wait = window
        bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        parts = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        tqdm.write(
            f"epoch {epoch + 1} step {step + 1}/{total} {parts} lr {lr:.3g} "
            f"samples/s {rate:.1f} data-wait {wait:.0%}"
        )
        global_step = epoch * total + step + 1
        for k, v in values.items():
            self.writer.add_scalar(f"train_step/{k}", v, global_step)
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
        for split in ("train", "test"):
            for k, v in record[split].items():
                if isinstance(v, (int, float)) and k not in NOT_SCALARS:
                    self.writer.add_scalar(f"{split}/{k}", v, epoch)
        if grid is not None:
            self.writer.add_image("test/samples", figures.pil_to_tensor(grid), epoch)
        for name, param in weights.named_parameters() if weights is not None else ():
            self.writer.add_histogram(f"weights/{name}", param.detach().float().cpu(), epoch)
        self.writer.flush()
        test = record["test"]
        tqdm.write(
            f"epoch {epoch}: train loss {record['train']['loss']:.4f}, test loss "
            f"{test['loss']:.4f} IoU {test['iou']:.4f} Dice {test['dice']:.4f} depth RMSE "
            f"{test['depth_rmse']:.4f}{' (best)' if is_best else ''}"
        )

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        """``prefix/key`` scalars for the numeric entries of ``values`` (e.g. ``gpu/*``)."""
        if not self.enabled:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

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
        print(f"TensorBoard:    tensorboard --logdir {out / 'tb'}")

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
